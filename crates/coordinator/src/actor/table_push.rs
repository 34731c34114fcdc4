//! A table encoded once for every router.
//!
//! At 10,000 workers a table holds 10,000 routes; the generated client
//! takes its request by value, so each of ten routers cost a deep copy and
//! an encoding of it (a sixth of the coordinator's CPU during a promotion
//! of every endpoint). The request is encoded here once and each router's
//! call writes the same bytes.

use bytes::{BufMut, Bytes};
use crossfade_proto::v1;
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic_prost::ProstDecoder;

/// The method the generated client calls.
const APPLY_TABLE: &str = "/crossfade.v1.RouterControl/ApplyTable";

/// An `ApplyTableRequest`, encoded.
#[derive(Debug, Clone)]
pub struct EncodedTable {
    /// The table's version.
    pub version: u64,
    bytes: Bytes,
}

impl EncodedTable {
    /// `table` as `epoch` commands it.
    pub fn new(epoch: u64, table: v1::RoutingTable) -> Self {
        let version = table.version;
        let request = v1::ApplyTableRequest {
            coordinator_epoch: epoch,
            table: Some(table),
        };
        Self {
            version,
            bytes: request.encode_to_vec().into(),
        }
    }
}

/// Sends `table` to the router behind `channel`: `RouterControl.ApplyTable`
/// as the generated client sends it, with the bytes already encoded.
pub async fn apply_table(
    channel: Channel,
    request: tonic::Request<EncodedTable>,
) -> Result<tonic::Response<v1::ApplyTableResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("router not ready: {e}")))?;
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(APPLY_TABLE),
        Preencoded,
    )
    .await
}

/// Writes [`EncodedTable`]s as they are; reads answers with prost.
struct Preencoded;

impl Codec for Preencoded {
    type Encode = EncodedTable;
    type Decode = v1::ApplyTableResponse;
    type Encoder = Preencoded;
    type Decoder = ProstDecoder<v1::ApplyTableResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        Preencoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

impl Encoder for Preencoded {
    type Item = EncodedTable;
    type Error = Status;

    fn encode(&mut self, item: EncodedTable, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.bytes);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_are_the_generated_request() {
        let table = v1::RoutingTable {
            version: 7,
            endpoints: vec![v1::EndpointRoute {
                name: "chat".into(),
                aliases: vec!["gpt".into()],
                created: 5,
                deployments: vec![v1::DeploymentRoute {
                    id: "dep-3".into(),
                    weight: 30,
                    max_model_len: 4096,
                    workers: vec![v1::WorkerRoute {
                        address: "127.0.0.1:9000".into(),
                        worker_id: "w1".into(),
                    }],
                }],
            }],
        };
        let encoded = EncodedTable::new(4, table.clone());
        assert_eq!(encoded.version, 7);
        let decoded = v1::ApplyTableRequest::decode(encoded.bytes.clone()).unwrap();
        assert_eq!(decoded.coordinator_epoch, 4);
        assert_eq!(decoded.table, Some(table));
    }
}

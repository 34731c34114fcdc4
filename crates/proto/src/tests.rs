use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

use crate::FILE_DESCRIPTOR_SET;
use crate::v1::{EnvVar, env_var::Source};

fn descriptor_set() -> FileDescriptorSet {
    FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("the build script wrote a valid set")
}

fn crossfade_files(
    set: &FileDescriptorSet,
) -> impl Iterator<Item = &prost_types::FileDescriptorProto> {
    set.file.iter().filter(|f| f.package() == "crossfade.v1")
}

/// Every RPC that DESIGN.md §3 names, per service. The later issues build on
/// exactly these; a rename or a dropped RPC must show up here.
#[test]
fn services_have_every_rpc_of_the_design() {
    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        (
            "Agent",
            vec![
                "GetStatus",
                "WatchStatus",
                "Apply",
                "Drain",
                "Undrain",
                "Stop",
            ],
        ),
        ("RouterControl", vec!["ApplyTable", "GetTable", "GetStats"]),
        (
            "Coordinator",
            vec![
                "CreateEndpoint",
                "GetEndpoint",
                "ListEndpoints",
                "DeleteEndpoint",
                "UpdateScaling",
                "UpdatePromotionSettings",
                "UpdateWorkerSelector",
                "UpdateAliases",
                "WatchEndpoint",
                "Promote",
                "History",
                "PausePromotion",
                "ResumePromotion",
                "CancelPromotion",
                "ForceCancelPromotion",
                "ForceRollForwardPromotion",
                "ListWorkers",
                "AddWorker",
                "RemoveWorker",
                "CordonWorker",
                "UncordonWorker",
                "ListRouters",
                "AddRouter",
                "RemoveRouter",
                // Not in the design: routers' demand hints (issue 14).
                "ReportDemand",
            ],
        ),
    ]);

    let set = descriptor_set();
    let mut found = BTreeMap::new();
    for file in crossfade_files(&set) {
        for service in &file.service {
            let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
            found.insert(service.name(), methods);
        }
    }
    assert_eq!(found, expected);

    // The streams the design calls streams, and nothing else.
    let streaming: BTreeSet<&str> = crossfade_files(&set)
        .flat_map(|f| &f.service)
        .flat_map(|s| &s.method)
        .filter(|m| m.server_streaming() || m.client_streaming())
        .map(|m| m.name())
        .collect();
    assert_eq!(streaming, BTreeSet::from(["WatchEndpoint", "WatchStatus"]));
}

/// The issue asks for a one-line comment on every field; this holds every
/// message, field, oneof, enum, enum value, service and RPC to it.
#[test]
fn every_element_of_the_contract_is_commented() {
    let set = descriptor_set();
    let mut missing = Vec::new();
    for file in crossfade_files(&set) {
        let commented: BTreeSet<Vec<i32>> = file
            .source_code_info
            .as_ref()
            .expect("protox keeps source info")
            .location
            .iter()
            .filter(|l| l.leading_comments().trim().len() > 1)
            .map(|l| l.path.clone())
            .collect();
        let mut check = |path: Vec<i32>, what: String| {
            if !commented.contains(&path) {
                missing.push(format!("{}: {what}", file.name()));
            }
        };
        for (i, message) in file.message_type.iter().enumerate() {
            walk_message(message, vec![4, i as i32], message.name(), &mut check);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            walk_enum(e, vec![5, i as i32], e.name(), &mut check);
        }
        for (i, service) in file.service.iter().enumerate() {
            check(vec![6, i as i32], format!("service {}", service.name()));
            for (j, method) in service.method.iter().enumerate() {
                check(
                    vec![6, i as i32, 2, j as i32],
                    format!("rpc {}.{}", service.name(), method.name()),
                );
            }
        }
    }
    assert!(missing.is_empty(), "uncommented: {missing:#?}");
}

fn walk_message(
    message: &DescriptorProto,
    path: Vec<i32>,
    name: &str,
    check: &mut impl FnMut(Vec<i32>, String),
) {
    check(path.clone(), format!("message {name}"));
    for (j, field) in message.field.iter().enumerate() {
        let is_map_entry_field = message.options.as_ref().is_some_and(|o| o.map_entry());
        if !is_map_entry_field {
            check(
                [path.as_slice(), &[2, j as i32]].concat(),
                format!("field {name}.{}", field.name()),
            );
        }
    }
    for (j, oneof) in message.oneof_decl.iter().enumerate() {
        // proto3 `optional` makes a synthetic oneof named `_field`.
        if !oneof.name().starts_with('_') {
            check(
                [path.as_slice(), &[8, j as i32]].concat(),
                format!("oneof {name}.{}", oneof.name()),
            );
        }
    }
    for (j, nested) in message.nested_type.iter().enumerate() {
        if nested.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        walk_message(
            nested,
            [path.as_slice(), &[3, j as i32]].concat(),
            &format!("{name}.{}", nested.name()),
            check,
        );
    }
    for (j, e) in message.enum_type.iter().enumerate() {
        walk_enum(
            e,
            [path.as_slice(), &[4, j as i32]].concat(),
            &format!("{name}.{}", e.name()),
            check,
        );
    }
}

fn walk_enum(
    e: &EnumDescriptorProto,
    path: Vec<i32>,
    name: &str,
    check: &mut impl FnMut(Vec<i32>, String),
) {
    check(path.clone(), format!("enum {name}"));
    for (j, value) in e.value.iter().enumerate() {
        check(
            [path.as_slice(), &[2, j as i32]].concat(),
            format!("enum value {}", value.name()),
        );
    }
}

#[test]
fn a_secret_env_var_never_shows_its_value_in_debug() {
    let secret = EnvVar {
        name: "HF_TOKEN".into(),
        source: Some(Source::Value("hf_abcdefsecret".into())),
        secret: true,
        redacted: false,
    };
    let shown = format!("{secret:?} {:?}", secret.source);
    assert!(!shown.contains("hf_abcdefsecret"), "{shown}");
    assert!(shown.contains("HF_TOKEN"), "{shown}");
    assert!(shown.contains("redacted, 15 bytes"), "{shown}");

    let plain = EnvVar {
        name: "VLLM_LOGGING_LEVEL".into(),
        source: Some(Source::Value("DEBUG".into())),
        secret: false,
        redacted: false,
    };
    assert!(format!("{plain:?}").contains("\"DEBUG\""));
    // The oneof alone cannot know whether its parent is secret.
    assert!(!format!("{:?}", plain.source).contains("DEBUG"));

    // A secret nested in a template stays hidden too.
    let template = crate::v1::Template {
        env: vec![secret],
        ..Default::default()
    };
    assert!(!format!("{template:?}").contains("hf_abcdefsecret"));
}

/// A real gRPC server with health and reflection built from the embedded
/// descriptor set: a reflection client can list the services and fetch the
/// file that defines the Agent, its imports resolved.
#[tokio::test]
async fn reflection_and_health_serve_the_contract() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let (reflection, reflection_v1alpha) = crate::reflection_services(crate::service_names::AGENT)
        .expect("the descriptor set is complete");
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(
            crate::service_names::AGENT,
            tonic_health::ServingStatus::Serving,
        )
        .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health_client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health_client
        .check(tonic_health::pb::HealthCheckRequest {
            service: crate::service_names::AGENT.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // v1alpha, as grpcurl 1.8 asks: the port's services, and only those.
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let mut listed = alpha
        .server_reflection_info(tokio_stream::iter([
            tonic_reflection::pb::v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(
                    tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                        String::new(),
                    ),
                ),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a list of services");
    };
    let alpha_services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    let expected: BTreeSet<String> = [crate::service_names::AGENT]
        .into_iter()
        .chain(crate::STANDARD_SERVICES)
        .map(str::to_owned)
        .collect();
    assert_eq!(alpha_services, expected);

    let mut client = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(crate::service_names::AGENT.into()),
        // What a client asks next: the imports, by file name.
        MessageRequest::FileByFilename("crossfade/v1/types.proto".into()),
        MessageRequest::FileByFilename("google/protobuf/duration.proto".into()),
    ])
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a list of services");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(
        services, expected,
        "the Agent's port lists no other crossfade service"
    );

    for expected in [
        "crossfade/v1/agent.proto",
        "crossfade/v1/types.proto",
        "google/protobuf/duration.proto",
    ] {
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected the file {expected}");
        };
        let names: Vec<String> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                prost_types::FileDescriptorProto::decode(bytes.as_slice())
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect();
        assert_eq!(names, [expected]);
    }

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

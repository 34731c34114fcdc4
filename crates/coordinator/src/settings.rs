//! Promotion and scaling settings, with the bounds of DESIGN §4. Anything
//! outside them is refused with a [`FieldError`] naming the field, its
//! allowed range and the value given.

use crossfade_common::FieldError;
use crossfade_proto::v1;
use serde::{Deserialize, Serialize};

/// What happens to the old deployment's replicas when a promotion succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cleanup {
    /// Stop them; keep the deployment's record for a later promotion back.
    ScaleToZero,
    /// Leave any still running (a force roll forward leaves them warm).
    Keep,
    /// Stop them and mark the deployment unusable.
    Deactivate,
}

/// How a promotion moves traffic (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionSettings {
    /// Step by step (true), or the candidate fully up then 100 % at once.
    pub rolling_deploy: bool,
    /// Surge mode: candidate replicas started ahead of retiring old ones,
    /// as a percent of the replica target (0 ..= 50).
    pub max_surge_percent: u32,
    /// Unavailable mode: old replicas retired and replaced in place, as a
    /// percent of the replica target (0 ..= 50). Exactly one of the two
    /// percentages is non-zero.
    pub max_unavailable_percent: u32,
    /// Wait after each step before the next (0 ..= 3600 s).
    pub stabilization_time_seconds: u32,
    /// Extra old replicas started before the first step, as a percent of
    /// the replica target (0 ..= 500).
    pub replica_overhead_percent: u32,
    /// What happens to old replicas at success.
    pub cleanup: Cleanup,
    /// How long a retiring replica's requests may take (1 ..= 86400 s).
    pub drain_timeout_seconds: u32,
    /// How long a candidate replica may take to become ready (1 ..= 86400 s).
    pub ready_timeout_seconds: u32,
    /// The health gate fails the candidate when its failure rate exceeds
    /// the old deployment's by more than this many points (0 ..= 100).
    #[serde(default = "default_gate_margin")]
    pub health_gate_margin_percent: u32,
    /// Requests the candidate must have served before the gate judges it
    /// (1 ..= 1000000).
    #[serde(default = "default_gate_min_requests")]
    pub health_gate_min_requests: u32,
}

/// The health gate's default margin, in percentage points.
pub const DEFAULT_GATE_MARGIN_PERCENT: u32 = 5;
/// The health gate's default minimum of candidate requests.
pub const DEFAULT_GATE_MIN_REQUESTS: u32 = 20;

fn default_gate_margin() -> u32 {
    DEFAULT_GATE_MARGIN_PERCENT
}

fn default_gate_min_requests() -> u32 {
    DEFAULT_GATE_MIN_REQUESTS
}

impl Default for PromotionSettings {
    fn default() -> Self {
        Self {
            rolling_deploy: false,
            max_surge_percent: 10,
            max_unavailable_percent: 0,
            stabilization_time_seconds: 0,
            replica_overhead_percent: 0,
            cleanup: Cleanup::ScaleToZero,
            drain_timeout_seconds: 600,
            ready_timeout_seconds: 1800,
            health_gate_margin_percent: DEFAULT_GATE_MARGIN_PERCENT,
            health_gate_min_requests: DEFAULT_GATE_MIN_REQUESTS,
        }
    }
}

impl PromotionSettings {
    /// These settings with `update`'s fields over them, validated; errors
    /// name `prefix.field`.
    pub fn updated(
        &self,
        update: &v1::PromotionSettingsUpdate,
        prefix: &str,
    ) -> Result<Self, Vec<FieldError>> {
        let mut next = *self;
        let mut errors = Vec::new();
        if let Some(v) = update.rolling_deploy {
            next.rolling_deploy = v;
        }
        if let Some(v) = update.max_surge_percent {
            next.max_surge_percent = v;
        }
        if let Some(v) = update.max_unavailable_percent {
            next.max_unavailable_percent = v;
        }
        if let Some(v) = update.stabilization_time_seconds {
            next.stabilization_time_seconds = v;
        }
        if let Some(v) = update.replica_overhead_percent {
            next.replica_overhead_percent = v;
        }
        if let Some(v) = update.promotion_cleanup_strategy {
            match v1::CleanupStrategy::try_from(v) {
                Ok(v1::CleanupStrategy::ScaleToZero) => next.cleanup = Cleanup::ScaleToZero,
                Ok(v1::CleanupStrategy::Keep) => next.cleanup = Cleanup::Keep,
                Ok(v1::CleanupStrategy::Deactivate) => next.cleanup = Cleanup::Deactivate,
                Ok(v1::CleanupStrategy::Unspecified) | Err(_) => errors.push(FieldError::new(
                    format!("{prefix}.promotion_cleanup_strategy"),
                    format!(
                        "must be SCALE_TO_ZERO, KEEP or DEACTIVATE, got {}",
                        v1::CleanupStrategy::try_from(v)
                            .map_or_else(|_| v.to_string(), |s| s.as_str_name().to_owned())
                    ),
                )),
            }
        }
        if let Some(v) = update.drain_timeout_seconds {
            next.drain_timeout_seconds = v;
        }
        if let Some(v) = update.ready_timeout_seconds {
            next.ready_timeout_seconds = v;
        }
        if let Some(v) = update.health_gate_margin_percent {
            next.health_gate_margin_percent = v;
        }
        if let Some(v) = update.health_gate_min_requests {
            next.health_gate_min_requests = v;
        }
        errors.extend(next.validate(prefix));
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }

    /// Every field outside its bounds, named `prefix.field`.
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut errors = Vec::new();
        for (field, value, range) in [
            ("max_surge_percent", self.max_surge_percent, 0..=50),
            (
                "max_unavailable_percent",
                self.max_unavailable_percent,
                0..=50,
            ),
            (
                "stabilization_time_seconds",
                self.stabilization_time_seconds,
                0..=3600,
            ),
            (
                "replica_overhead_percent",
                self.replica_overhead_percent,
                0..=500,
            ),
            (
                "drain_timeout_seconds",
                self.drain_timeout_seconds,
                1..=86_400,
            ),
            (
                "ready_timeout_seconds",
                self.ready_timeout_seconds,
                1..=86_400,
            ),
            (
                "health_gate_margin_percent",
                self.health_gate_margin_percent,
                0..=100,
            ),
            (
                "health_gate_min_requests",
                self.health_gate_min_requests,
                1..=1_000_000,
            ),
        ] {
            errors.extend(FieldError::check_range(&key(field), value, range));
        }
        if (self.max_surge_percent == 0) == (self.max_unavailable_percent == 0) {
            errors.push(FieldError::new(
                key("max_unavailable_percent"),
                format!(
                    "exactly one of max_surge_percent and max_unavailable_percent must be non-zero, got {} and {}",
                    self.max_surge_percent, self.max_unavailable_percent
                ),
            ));
        }
        errors
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::PromotionSettings {
        v1::PromotionSettings {
            rolling_deploy: self.rolling_deploy,
            max_surge_percent: self.max_surge_percent,
            max_unavailable_percent: self.max_unavailable_percent,
            stabilization_time_seconds: self.stabilization_time_seconds,
            replica_overhead_percent: self.replica_overhead_percent,
            promotion_cleanup_strategy: match self.cleanup {
                Cleanup::ScaleToZero => v1::CleanupStrategy::ScaleToZero,
                Cleanup::Keep => v1::CleanupStrategy::Keep,
                Cleanup::Deactivate => v1::CleanupStrategy::Deactivate,
            } as i32,
            drain_timeout_seconds: self.drain_timeout_seconds,
            ready_timeout_seconds: self.ready_timeout_seconds,
            health_gate_margin_percent: self.health_gate_margin_percent,
            health_gate_min_requests: self.health_gate_min_requests,
        }
    }

    /// Surge mode (else unavailable mode).
    pub fn surge(&self) -> bool {
        self.max_surge_percent > 0
    }

    /// Replicas moved per step for a target of `n`:
    /// `max(1, ceil(n × percent / 100))`, all of them when not rolling.
    pub fn step_size(&self, n: u32) -> u32 {
        if !self.rolling_deploy {
            return n.max(1);
        }
        self.in_place_size(n)
    }

    /// Replicas updated in place at once for a target of `n`, when no idle
    /// worker can take a new one: `max(1, ceil(n × percent / 100))`, the
    /// step percentage even when not rolling, so that no update takes the
    /// routed replicas below `n − k` (DESIGN §4, the capacity floor).
    pub fn in_place_size(&self, n: u32) -> u32 {
        let percent = self.max_surge_percent.max(self.max_unavailable_percent);
        n.saturating_mul(percent).div_ceil(100).max(1)
    }

    /// Extra old replicas to start before the first step.
    pub fn overhead(&self, n: u32) -> u32 {
        n.saturating_mul(self.replica_overhead_percent)
            .div_ceil(100)
    }
}

/// How many replicas an endpoint runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scaling {
    /// Fewest replicas (0 ..= max_replicas).
    pub min_replicas: u32,
    /// Most replicas (0 ..= 10000: an endpoint may span a fleet).
    pub max_replicas: u32,
    /// In-flight requests one replica should carry (1 ..= 100000).
    pub target_in_flight_per_replica: u32,
    /// How long load must stay low before replicas are removed (0 ..= 86400 s).
    pub scale_down_delay_seconds: u32,
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 1,
            target_in_flight_per_replica: 32,
            scale_down_delay_seconds: 300,
        }
    }
}

impl Scaling {
    /// These settings with the fields `update` sets changed, validated as a
    /// whole; errors name `prefix.field`.
    pub fn updated(
        &self,
        update: &v1::ScalingUpdate,
        prefix: &str,
    ) -> Result<Self, Vec<FieldError>> {
        let next = Self {
            min_replicas: update.min_replicas.unwrap_or(self.min_replicas),
            max_replicas: update.max_replicas.unwrap_or(self.max_replicas),
            target_in_flight_per_replica: update
                .target_in_flight_per_replica
                .unwrap_or(self.target_in_flight_per_replica),
            scale_down_delay_seconds: update
                .scale_down_delay_seconds
                .unwrap_or(self.scale_down_delay_seconds),
        };
        let errors = next.validate(prefix);
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }

    /// From the wire, validated; errors name `prefix.field`.
    pub fn from_proto(
        scaling: &v1::ScalingSettings,
        prefix: &str,
    ) -> Result<Self, Vec<FieldError>> {
        let scaling = Self {
            min_replicas: scaling.min_replicas,
            max_replicas: scaling.max_replicas,
            target_in_flight_per_replica: scaling.target_in_flight_per_replica,
            scale_down_delay_seconds: scaling.scale_down_delay_seconds,
        };
        let errors = scaling.validate(prefix);
        if errors.is_empty() {
            Ok(scaling)
        } else {
            Err(errors)
        }
    }

    /// Every field outside its bounds, named `prefix.field`.
    pub fn validate(&self, prefix: &str) -> Vec<FieldError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut errors = Vec::new();
        errors.extend(FieldError::check_range(
            &key("max_replicas"),
            self.max_replicas,
            0..=10_000,
        ));
        errors.extend(FieldError::check_range(
            &key("min_replicas"),
            self.min_replicas,
            0..=self.max_replicas,
        ));
        errors.extend(FieldError::check_range(
            &key("target_in_flight_per_replica"),
            self.target_in_flight_per_replica,
            1..=100_000,
        ));
        errors.extend(FieldError::check_range(
            &key("scale_down_delay_seconds"),
            self.scale_down_delay_seconds,
            0..=86_400,
        ));
        errors
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::ScalingSettings {
        v1::ScalingSettings {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_in_flight_per_replica: self.target_in_flight_per_replica,
            scale_down_delay_seconds: self.scale_down_delay_seconds,
        }
    }

    /// Replicas for `in_flight` requests in all:
    /// `clamp(ceil(in_flight / target), min, max)`.
    pub fn desired(&self, in_flight: u64) -> u32 {
        let wanted = in_flight.div_ceil(u64::from(self.target_in_flight_per_replica.max(1)));
        u32::try_from(wanted)
            .unwrap_or(u32::MAX)
            .clamp(self.min_replicas, self.max_replicas)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refused(update: v1::PromotionSettingsUpdate) -> Vec<String> {
        PromotionSettings::default()
            .updated(&update, "settings")
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_defaults_are_the_designs_and_valid() {
        let d = PromotionSettings::default();
        assert_eq!(d.validate("settings"), Vec::new());
        assert!(!d.rolling_deploy);
        assert_eq!((d.max_surge_percent, d.max_unavailable_percent), (10, 0));
        assert_eq!(
            (d.drain_timeout_seconds, d.ready_timeout_seconds),
            (600, 1800)
        );
        assert_eq!(d.cleanup, Cleanup::ScaleToZero);
    }

    #[test]
    fn each_out_of_range_setting_is_refused_by_name() {
        let cases: [(v1::PromotionSettingsUpdate, &str); 8] = [
            (
                v1::PromotionSettingsUpdate {
                    max_surge_percent: Some(51),
                    ..Default::default()
                },
                "`settings.max_surge_percent`: must be within 0..=50, got 51",
            ),
            (
                v1::PromotionSettingsUpdate {
                    max_surge_percent: Some(0),
                    max_unavailable_percent: Some(51),
                    ..Default::default()
                },
                "`settings.max_unavailable_percent`: must be within 0..=50, got 51",
            ),
            (
                v1::PromotionSettingsUpdate {
                    stabilization_time_seconds: Some(3601),
                    ..Default::default()
                },
                "`settings.stabilization_time_seconds`: must be within 0..=3600, got 3601",
            ),
            (
                v1::PromotionSettingsUpdate {
                    replica_overhead_percent: Some(501),
                    ..Default::default()
                },
                "`settings.replica_overhead_percent`: must be within 0..=500, got 501",
            ),
            (
                v1::PromotionSettingsUpdate {
                    drain_timeout_seconds: Some(0),
                    ..Default::default()
                },
                "`settings.drain_timeout_seconds`: must be within 1..=86400, got 0",
            ),
            (
                v1::PromotionSettingsUpdate {
                    ready_timeout_seconds: Some(86_401),
                    ..Default::default()
                },
                "`settings.ready_timeout_seconds`: must be within 1..=86400, got 86401",
            ),
            (
                v1::PromotionSettingsUpdate {
                    max_unavailable_percent: Some(10),
                    ..Default::default()
                },
                "`settings.max_unavailable_percent`: exactly one of max_surge_percent and max_unavailable_percent must be non-zero, got 10 and 10",
            ),
            (
                v1::PromotionSettingsUpdate {
                    promotion_cleanup_strategy: Some(0),
                    ..Default::default()
                },
                "`settings.promotion_cleanup_strategy`: must be SCALE_TO_ZERO, KEEP or DEACTIVATE, got CLEANUP_STRATEGY_UNSPECIFIED",
            ),
        ];
        for (update, message) in cases {
            assert_eq!(refused(update), [message]);
        }
    }

    #[test]
    fn an_update_changes_only_what_it_names() {
        let updated = PromotionSettings::default()
            .updated(
                &v1::PromotionSettingsUpdate {
                    rolling_deploy: Some(true),
                    max_surge_percent: Some(0),
                    max_unavailable_percent: Some(25),
                    promotion_cleanup_strategy: Some(v1::CleanupStrategy::Keep as i32),
                    ..Default::default()
                },
                "settings",
            )
            .unwrap();
        assert!(updated.rolling_deploy && !updated.surge());
        assert_eq!(updated.max_unavailable_percent, 25);
        assert_eq!(updated.cleanup, Cleanup::Keep);
        assert_eq!(updated.drain_timeout_seconds, 600);
        assert_eq!(
            updated.to_proto().promotion_cleanup_strategy,
            v1::CleanupStrategy::Keep as i32
        );
    }

    #[test]
    fn the_step_moves_at_least_one_replica() {
        let rolling = |surge, unavailable| PromotionSettings {
            rolling_deploy: true,
            max_surge_percent: surge,
            max_unavailable_percent: unavailable,
            ..PromotionSettings::default()
        };
        assert_eq!(rolling(10, 0).step_size(4), 1);
        assert_eq!(rolling(25, 0).step_size(4), 1);
        assert_eq!(rolling(50, 0).step_size(4), 2);
        assert_eq!(rolling(0, 30).step_size(10), 3);
        assert_eq!(rolling(0, 34).step_size(10), 4);
        assert_eq!(PromotionSettings::default().step_size(7), 7);
        assert_eq!(rolling(10, 0).overhead(4), 0);
        assert_eq!(
            PromotionSettings {
                replica_overhead_percent: 50,
                ..rolling(10, 0)
            }
            .overhead(3),
            2
        );
    }

    #[test]
    fn scaling_is_bounded_and_clamps_the_load() {
        let scaling = Scaling {
            min_replicas: 1,
            max_replicas: 4,
            target_in_flight_per_replica: 10,
            scale_down_delay_seconds: 60,
        };
        assert_eq!(scaling.validate("scaling"), Vec::new());
        assert_eq!(scaling.desired(0), 1);
        assert_eq!(scaling.desired(11), 2);
        assert_eq!(scaling.desired(1000), 4);
        let errors: Vec<String> = Scaling::from_proto(
            &v1::ScalingSettings {
                min_replicas: 3,
                max_replicas: 2,
                target_in_flight_per_replica: 0,
                scale_down_delay_seconds: 0,
            },
            "scaling",
        )
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            errors,
            [
                "`scaling.min_replicas`: must be within 0..=2, got 3",
                "`scaling.target_in_flight_per_replica`: must be within 1..=100000, got 0",
            ]
        );
        let zero = Scaling {
            min_replicas: 0,
            max_replicas: 0,
            ..scaling
        };
        assert_eq!(zero.desired(500), 0);
    }

    #[test]
    fn the_health_gate_settings_are_bounded_by_name() {
        let update = v1::PromotionSettingsUpdate {
            health_gate_margin_percent: Some(101),
            health_gate_min_requests: Some(0),
            ..Default::default()
        };
        assert_eq!(
            refused(update),
            [
                "`settings.health_gate_margin_percent`: must be within 0..=100, got 101",
                "`settings.health_gate_min_requests`: must be within 1..=1000000, got 0",
            ]
        );
        let update = v1::PromotionSettingsUpdate {
            health_gate_margin_percent: Some(0),
            ..Default::default()
        };
        let settings = PromotionSettings::default()
            .updated(&update, "settings")
            .unwrap();
        assert_eq!(settings.health_gate_margin_percent, 0);
        assert_eq!(settings.health_gate_min_requests, DEFAULT_GATE_MIN_REQUESTS);
        // A state stored before these settings existed loads with defaults.
        let mut stored = serde_json::to_value(PromotionSettings::default()).unwrap();
        stored
            .as_object_mut()
            .unwrap()
            .remove("health_gate_margin_percent");
        let loaded: PromotionSettings = serde_json::from_value(stored).unwrap();
        assert_eq!(
            loaded.health_gate_margin_percent,
            DEFAULT_GATE_MARGIN_PERCENT
        );
    }

    #[test]
    fn a_scaling_update_changes_only_the_fields_it_sets() {
        let scaling = Scaling {
            min_replicas: 1,
            max_replicas: 4,
            target_in_flight_per_replica: 10,
            scale_down_delay_seconds: 60,
        };
        let update = v1::ScalingUpdate {
            max_replicas: Some(8),
            ..Default::default()
        };
        assert_eq!(
            scaling.updated(&update, "scaling").unwrap(),
            Scaling {
                max_replicas: 8,
                ..scaling
            }
        );
        // Checked as a whole: a max below the kept min is refused.
        let update = v1::ScalingUpdate {
            max_replicas: Some(0),
            ..Default::default()
        };
        let errors = scaling.updated(&update, "scaling").unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "`scaling.min_replicas`: must be within 0..=0, got 1"
        );
    }
}

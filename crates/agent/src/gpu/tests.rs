use std::time::{Duration, SystemTime};

use super::fake::FakeGpuProbe;
use super::nvml::NvmlProbe;
use super::*;

fn at(now: SystemTime, ago_secs: u64) -> SystemTime {
    now - Duration::from_secs(ago_secs)
}

fn with(change: impl FnOnce(&mut GpuReading)) -> GpuReading {
    let mut gpu = FakeGpuProbe::h100(0);
    change(&mut gpu);
    gpu
}

#[test]
fn each_condition_gets_the_class_the_design_gives_it() {
    let now = SystemTime::now();
    let xid = |code| Xid {
        code,
        at: at(now, 5),
    };
    let cases: Vec<(GpuReading, Health, &str)> = vec![
        (FakeGpuProbe::h100(0), Health::Healthy, ""),
        (with(|g| g.lost = true), Health::Unhealthy, "GPU is lost"),
        (
            with(|g| g.ecc_volatile_uncorrected = Some(2)),
            Health::Unhealthy,
            "2 uncorrected ECC errors",
        ),
        (
            with(|g| g.row_remap_failed = Some(true)),
            Health::Unhealthy,
            "row remapping failed",
        ),
        (
            with(|g| g.row_remap_pending = Some(true)),
            Health::ResetRequired,
            "row remap pending",
        ),
        (
            with(|g| g.retired_pages_pending = Some(true)),
            Health::ResetRequired,
            "pages pending retirement",
        ),
        (
            with(|g| g.throttle_reasons = vec!["hw_thermal_slowdown".into()]),
            Health::Warning,
            "throttled: hw_thermal_slowdown",
        ),
        (
            with(|g| g.xids = vec![xid(13)]),
            Health::Warning,
            "application XID 13",
        ),
        (with(|g| g.xids = vec![xid(92)]), Health::Warning, "XID 92"),
    ];
    for (gpu, expected, reason) in cases {
        let (health, reasons) = classify(&gpu, now);
        assert_eq!(health, expected, "{reasons:?}");
        if expected == Health::Healthy {
            assert!(reasons.is_empty(), "{reasons:?}");
        } else {
            assert!(
                reasons.iter().any(|r| r.contains(reason)),
                "{reason:?} not in {reasons:?}"
            );
        }
    }
    for code in FATAL_XIDS {
        let (health, reasons) = classify(&with(|g| g.xids = vec![xid(*code)]), now);
        assert_eq!(health, Health::Unhealthy, "XID {code}: {reasons:?}");
    }
    for code in RESET_XIDS {
        let (health, _) = classify(&with(|g| g.xids = vec![xid(*code)]), now);
        assert_eq!(health, Health::ResetRequired, "XID {code}");
    }
    for code in APPLICATION_XIDS {
        let (health, _) = classify(&with(|g| g.xids = vec![xid(*code)]), now);
        assert_eq!(health, Health::Warning, "XID {code}");
    }
}

#[test]
fn repeated_application_xids_escalate_and_old_xids_expire() {
    let now = SystemTime::now();
    let repeated = with(|g| {
        g.xids = (0..3)
            .map(|i| Xid {
                code: 43,
                at: at(now, 10 * i),
            })
            .collect();
    });
    let (health, reasons) = classify(&repeated, now);
    assert_eq!(health, Health::ResetRequired, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("restarts did not help")));

    let old = with(|g| {
        g.xids = vec![Xid {
            code: 79,
            at: at(now, XID_WINDOW.as_secs() + 1),
        }]
    });
    assert_eq!(classify(&old, now).0, Health::Healthy);
}

#[test]
fn the_worst_gpu_decides_and_no_nvml_is_unknown_never_healthy() {
    let now = SystemTime::now();
    let probe = FakeGpuProbe::with_gpus(vec![FakeGpuProbe::h100(0), FakeGpuProbe::h100(1)]);
    let host = assess(&probe, now);
    assert_eq!((host.probe, host.health), ("fake", Health::Healthy));

    probe.update(1, |g| g.xids.push(Xid { code: 79, at: now }));
    let host = assess(&probe, now);
    assert_eq!(host.health, Health::Unhealthy);
    let wire = host.to_proto();
    assert_eq!(wire[0].health(), v1::GpuHealth::Healthy);
    assert_eq!(wire[1].health(), v1::GpuHealth::Unhealthy);
    assert_eq!(wire[1].recent_xids[0].xid, 79);
    assert_eq!(wire[1].health_reasons, ["fatal XID 79"]);

    let none = assess(&FakeGpuProbe::without_nvml(), now);
    assert_eq!(none.health, Health::Unknown);
    assert!(none.error.unwrap().contains("no NVML"));
    assert_eq!(
        assess(&FakeGpuProbe::with_gpus(vec![]), now).health,
        Health::Unknown
    );
}

/// The real probe on this host: without a driver it reports NVML as
/// unavailable (health unknown) rather than failing; with one, it reads
/// every GPU.
#[test]
fn the_nvml_probe_is_unavailable_without_a_driver_or_reads_every_gpu() {
    match NvmlProbe::new(Visible::default()) {
        Err(e) => {
            assert!(matches!(e, ProbeError::Unavailable(_)), "{e}");
        }
        Ok(probe) => {
            let host = assess(&probe, SystemTime::now());
            assert_eq!(host.probe, "nvml");
            assert!(host.error.is_none(), "{:?}", host.error);
            assert!(host.gpus.iter().all(|(g, _, _)| g.uuid.starts_with("GPU-")));
        }
    }
}

#[test]
fn only_the_gpus_the_agent_was_given_are_read() {
    let host = || FakeGpuProbe::with_gpus((0..4).map(FakeGpuProbe::h100).collect());
    let indices = |probe: FakeGpuProbe| -> Vec<u32> {
        probe.read().unwrap().iter().map(|g| g.index).collect()
    };
    assert_eq!(indices(host()), [0, 1, 2, 3]);
    assert_eq!(indices(host().visible(Visible::parse(""))), [0, 1, 2, 3]);
    assert_eq!(indices(host().visible(Visible::parse("1, 3"))), [1, 3]);
    // A UUID or its prefix, as CUDA takes them.
    let uuid = FakeGpuProbe::h100(2).uuid;
    assert_eq!(indices(host().visible(Visible::parse(&uuid))), [2]);
    assert_eq!(
        indices(host().visible(Visible::parse(&uuid[..30]))),
        [0, 1, 2, 3]
    );
    assert_eq!(
        indices(host().visible(Visible::parse("GPU-00000000-0000-0000-0000-000000000003"))),
        [3]
    );
    assert!(indices(host().visible(Visible::parse("7"))).is_empty());
    assert_eq!(Visible::parse("0,GPU-ab").to_string(), "GPUs 0,GPU-ab");
}

#[test]
fn the_fault_file_scripts_a_running_fake() {
    let dir = std::env::temp_dir().join(format!("crossfade-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("faults.json");
    let probe =
        FakeGpuProbe::with_gpus((0..2).map(FakeGpuProbe::h100).collect()).faults_from(file.clone());
    // No file: no fault.
    assert_eq!(assess(&probe, SystemTime::now()).health, Health::Healthy);

    std::fs::write(&file, r#"{"1": {"xids": [13]}}"#).unwrap();
    let first = probe.read().unwrap();
    assert!(first[0].xids.is_empty());
    let stamped = first[1].xids[0];
    assert_eq!(stamped.code, 13);
    // One more XID appended: a new event; the first keeps its time.
    std::fs::write(&file, r#"{"1": {"xids": [13, 79]}}"#).unwrap();
    let second = probe.read().unwrap();
    assert_eq!(second[1].xids[0], stamped);
    assert_eq!(second[1].xids[1].code, 79);
    let host = assess(&probe, SystemTime::now());
    assert_eq!(host.health, Health::Unhealthy);
    assert!(
        host.gpus[1].2.iter().any(|r| r.contains("fatal XID 79")),
        "{:?}",
        host.gpus[1].2
    );

    let each = [
        (
            r#"{"0": {"ecc_volatile_uncorrected": 2}}"#,
            Health::Unhealthy,
        ),
        (r#"{"0": {"lost": true}}"#, Health::Unhealthy),
        (r#"{"0": {"row_remap_failed": true}}"#, Health::Unhealthy),
        (
            r#"{"0": {"row_remap_pending": true}}"#,
            Health::ResetRequired,
        ),
        (
            r#"{"0": {"retired_pages_pending": true}}"#,
            Health::ResetRequired,
        ),
        (r#"{"0": {"xids": [94]}}"#, Health::ResetRequired),
        (
            r#"{"0": {"throttle_reasons": ["hw_power_brake_slowdown"]}}"#,
            Health::Warning,
        ),
        ("{}", Health::Healthy),
    ];
    for (faults, expected) in each {
        std::fs::write(&file, faults).unwrap();
        assert_eq!(
            assess(&probe, SystemTime::now()).health,
            expected,
            "{faults}"
        );
    }
    // A file that does not parse is a failed read, named.
    std::fs::write(&file, r#"{"0": {"xid": 13}}"#).unwrap();
    let host = assess(&probe, SystemTime::now());
    assert_eq!(host.health, Health::Unknown);
    assert!(host.error.unwrap().contains("gpu.fake_faults"));
    std::fs::remove_dir_all(&dir).unwrap();
}

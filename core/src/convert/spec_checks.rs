//! The create's checks at the door: everything a node would refuse later is
//! INVALID_ARGUMENT naming the field (NUL bytes, env names, image references, something to
//! run, oversized strings), and the state machine refuses the same specs.

use super::fixtures::*;
use super::*;
use crate::state::{Command, ItemOutcome, Rejection, Submission};

fn create(spec: pb::SandboxSpec) -> Result<SandboxSpec, String> {
    ok(create_request_from_pb(&pb::CreateSandboxRequest {
        request_id: "r".into(),
        spec: Some(spec),
    }))
    .map(|(_, spec)| spec)
}

fn with(change: impl FnOnce(&mut pb::SandboxSpec)) -> pb::SandboxSpec {
    let mut spec = wire_spec();
    change(&mut spec);
    spec
}

#[test]
fn a_nul_byte_in_an_argument_is_named_by_its_index() {
    let spec = with(|s| s.command = vec!["sh".into(), "-c".into(), "echo a\0b".into()]);
    assert_eq!(
        create(spec),
        Err("spec.command[2]: contains a NUL byte".into())
    );
    let spec = with(|s| s.command = vec![String::new(), "x".into()]);
    assert_eq!(
        create(spec),
        Err("spec.command[0]: the program is empty".into())
    );
}

#[test]
fn env_names_and_values_are_checked_one_by_one() {
    let env = |pairs: &[(&str, &str)]| {
        with(|s| {
            s.env = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    };
    assert_eq!(
        create(env(&[("A=B", "1")])),
        Err("spec.env[\"A=B\"]: the name contains '=', which ends a name in an environment".into())
    );
    assert_eq!(
        create(env(&[("", "1")])),
        Err("spec.env[\"\"]: the name is empty".into())
    );
    assert_eq!(
        create(env(&[("A\0B", "1")])),
        Err("spec.env[\"A\\0B\"]: the name contains a NUL byte".into())
    );
    assert_eq!(
        create(env(&[("A", "x\0y")])),
        Err("spec.env[\"A\"]: the value contains a NUL byte".into())
    );
    // Every bad entry at once, in name order; '=' and NUL are fine in a value's neighbours.
    assert_eq!(
        create(env(&[("OK", "a=b"), ("B\0", ""), ("A=", "\0")])),
        Err([
            "spec.env[\"A=\"]: the name contains '=', which ends a name in an environment",
            "spec.env[\"A=\"]: the value contains a NUL byte",
            "spec.env[\"B\\0\"]: the name contains a NUL byte",
        ]
        .join("; "))
    );
}

#[test]
fn a_malformed_image_reference_is_named() {
    assert_eq!(
        create(with(|s| s.image = "Python:3".into())),
        Err(
            "spec.image: \"Python:3\" is not an image reference: path component \"Python\" \
             must be lowercase letters and digits, joined by '.', '_', '__' or dashes"
                .into()
        )
    );
    assert_eq!(
        create(with(|s| s.image = format!("r/{}", "a".repeat(600)))),
        Err("spec.image: is 602 bytes; the limit is 512".into())
    );
    for good in [
        "busybox",
        "127.0.0.1:5000/busybox:1",
        "ghcr.io/org/app:v1.2@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert!(create(with(|s| s.image = good.into())).is_ok(), "{good}");
    }
}

#[test]
fn a_command_is_required_only_without_an_image() {
    // The image's entrypoint and cmd run when the command is left out.
    let spec = create(with(|s| s.command.clear())).expect("image without command");
    assert!(spec.command.is_empty());
    let err = create(with(|s| {
        s.command.clear();
        s.image.clear();
        s.keep_alive = false;
    }));
    // A keep-alive sandbox may run nothing but berth's helper.
    assert!(
        create(with(|s| {
            s.command.clear();
            s.image.clear();
        }))
        .is_ok()
    );
    assert_eq!(
        err,
        Err("spec.command: required when spec.image is empty and spec.keep_alive is false".into())
    );
    // A spec that only describes a shape (pending demand, a trace) reads without one.
    let shape = with(|s| {
        s.command.clear();
        s.image.clear();
    });
    assert!(spec_from_pb(Some(&shape), "pending").is_ok());
}

#[test]
fn every_string_of_the_spec_is_bounded() {
    let long = "x".repeat(limits::SHORT_TEXT_BYTES + 1);
    let spec = with(|s| {
        s.labels.insert("k".into(), long.clone());
        if let Some(c) = s.constraints.as_mut() {
            c.regions.push(long.clone());
            c.tolerations[0].value = long.clone();
        }
    });
    assert_eq!(
        create(spec),
        Err([
            "spec.constraints.regions[1]: is 257 bytes; the limit is 256",
            "spec.constraints.tolerations[0].value: is 257 bytes; the limit is 256",
            "spec.labels[\"k\"]: is 257 bytes; the limit is 256",
        ]
        .join("; "))
    );
}

#[test]
fn the_state_machine_refuses_what_the_door_refuses() {
    let mut model = create(wire_spec()).expect("valid");
    model.gpu = None;
    model.env.insert("A=B".into(), "1".into());
    let mut state = State::new();
    let out = state.apply(
        &Command::SubmitSandboxes {
            items: vec![Submission::new("r".into(), model)],
        },
        1,
    );
    assert!(
        matches!(&out[..], [ItemOutcome::Rejected(Rejection::InvalidSpec(e))]
            if e.one_line() == "spec.env[\"A=B\"]: the name contains '=', which ends a name in an environment"),
        "{out:?}"
    );
}

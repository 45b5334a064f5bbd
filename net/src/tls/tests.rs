//! `TlsSettings::validate` names the field and the problem; a reload takes a complete,
//! valid set of files and ignores a broken one.

use std::time::Duration;

use berth_proto::Validator;

use super::pki::{LocalPki, unix_now};
use super::{Identity, Tls, TlsSettings};

fn problems(settings: &TlsSettings) -> Vec<(String, String)> {
    let mut v = Validator::new();
    settings.validate(&mut v);
    v.finish().map_or_else(
        |e| e.0.into_iter().map(|e| (e.field, e.message)).collect(),
        |()| Vec::new(),
    )
}

#[test]
fn validate_names_the_field_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = LocalPki::create(dir.path(), "local").expect("pki");
    let good = pki.issue("replica/1").expect("issue");
    assert!(problems(&good).is_empty(), "{:?}", problems(&good));

    let missing = TlsSettings {
        cert: dir.path().join("nope.pem").display().to_string(),
        ..good.clone()
    };
    let p = problems(&missing);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "cert");
    assert!(p[0].1.contains("nope.pem: cannot read"), "{p:?}");

    // A key that is not the certificate's.
    let other = pki.issue("replica/2").expect("issue");
    let mismatched = TlsSettings {
        key: other.key.clone(),
        ..good.clone()
    };
    let p = problems(&mismatched);
    assert_eq!(p[0].0, "key");
    assert!(p[0].1.contains("does not match the certificate"), "{p:?}");

    let id = Identity::parse("spiffe://local/replica/3").expect("id");
    let expired = pki
        .issue_identity(&id, Duration::from_secs(60), unix_now() - 7_200)
        .expect("issue");
    let p = problems(&expired);
    assert_eq!(p[0].0, "cert");
    assert!(
        p[0].1.contains("expired") && p[0].1.contains("replica/3"),
        "{p:?}"
    );

    // A certificate from another CA than the one named.
    let elsewhere = LocalPki::create(&dir.path().join("x"), "local").expect("pki");
    let foreign = TlsSettings {
        ca: good.ca.clone(),
        ..elsewhere.issue("replica/1").expect("issue")
    };
    let p = problems(&foreign);
    assert_eq!(p[0].0, "cert");
    assert!(p[0].1.contains("does not chain to the CA"), "{p:?}");

    let empty = problems(&TlsSettings::default());
    let fields: Vec<&str> = empty.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(fields, ["ca", "cert", "key"]);
    let insecure_with_files = TlsSettings {
        insecure: true,
        ..good
    };
    assert_eq!(problems(&insecure_with_files).len(), 3);
}

#[test]
fn a_reload_takes_new_files_and_ignores_broken_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = LocalPki::create(dir.path(), "local").expect("pki");
    let settings = pki.issue("node/n1").expect("issue");
    let tls = Tls::load(&settings).expect("load").expect("secure");
    let first = tls.not_after();
    assert!(!tls.reload_if_changed().expect("unchanged"));

    // A broken certificate file is refused and the old material stays.
    std::fs::write(&settings.cert, "not a certificate").expect("write");
    let err = tls.reload_if_changed().expect_err("broken");
    assert_eq!(err.field, "cert");
    assert_eq!(tls.not_after(), first);
    assert_eq!(tls.reloads(), 0);

    // A new, valid set is taken (a different validity shows it is the new one).
    let id = Identity::parse("spiffe://local/node/n1").expect("id");
    pki.issue_identity(&id, Duration::from_secs(3_600), unix_now())
        .expect("reissue");
    assert!(tls.reload_if_changed().expect("reloaded"));
    assert_ne!(tls.not_after(), first);
    assert_eq!(tls.reloads(), 1);
    assert_eq!(tls.identity(), id);
}

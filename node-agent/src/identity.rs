//! The agent's certificate: loaded from `[agent.tls]`, obtained with a join token when the
//! node has none yet (`NodeService.Join`), and renewed at half its lifetime
//! (`NodeService.RenewCertificate`). New files are written key first, then certificate,
//! each replaced in one rename; the reloader in `berth_net::tls` takes them once they match.

use std::path::Path;
use std::time::Duration;

use berth_net::tls::pki;
use berth_net::{Identity, Role, Tls};
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;

use crate::agent::AgentError;
use crate::config::AgentConfig;

fn tls_error(e: impl std::fmt::Display) -> AgentError {
    AgentError::Runtime(format!("agent.tls: {e}"))
}

/// The agent's TLS, or `None` when `[agent.tls] insecure = true`. Joins first when the
/// certificate file is missing and a join token is configured.
pub async fn prepare(cfg: &AgentConfig) -> Result<Option<Tls>, AgentError> {
    if cfg.tls.insecure {
        tracing::warn!(node = %cfg.node_id, "agent.tls.insecure = true: no TLS and no authentication");
        return Ok(None);
    }
    if !Path::new(&cfg.tls.cert).exists() && !cfg.join_token_file.is_empty() {
        join(cfg).await?;
    }
    let tls = Tls::load(&cfg.tls).map_err(tls_error)?;
    if let Some(tls) = &tls {
        let want = Role::Node(cfg.node_id.clone());
        if tls.identity().role != want {
            return Err(tls_error(format!(
                "cert: names {}; this agent is node {}",
                tls.identity(),
                cfg.node_id
            )));
        }
        tls.spawn_reloader();
    }
    Ok(tls)
}

fn write_pair(cfg: &AgentConfig, key_pem: &str, cert_pem: &str) -> Result<(), AgentError> {
    pki::write_private(Path::new(&cfg.tls.key), key_pem)
        .map_err(|e| tls_error(format!("key: writing {}: {e}", cfg.tls.key)))?;
    pki::write_public(Path::new(&cfg.tls.cert), cert_pem)
        .map_err(|e| tls_error(format!("cert: writing {}: {e}", cfg.tls.cert)))
}

async fn join(cfg: &AgentConfig) -> Result<(), AgentError> {
    let token = std::fs::read_to_string(&cfg.join_token_file)
        .map_err(|e| {
            AgentError::Runtime(format!(
                "agent.join_token_file {}: cannot read: {e}",
                cfg.join_token_file
            ))
        })?
        .trim()
        .to_owned();
    // The request's names are ignored by the CA; the cluster part is a placeholder.
    let (key_pem, csr_pem) =
        pki::signing_request(&Identity::new("join", Role::Node(cfg.node_id.clone())))
            .map_err(tls_error)?;
    let mut last = String::new();
    for round in 0..20u32 {
        for address in &cfg.schedulers {
            let channel =
                berth_net::join_channel(address, Path::new(&cfg.tls.ca)).map_err(tls_error)?;
            let request = pb::JoinRequest {
                token: token.clone(),
                node_id: cfg.node_id.clone(),
                csr_pem: csr_pem.clone(),
            };
            match NodeServiceClient::new(channel).join(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    write_pair(cfg, &key_pem, &answer.cert_pem)?;
                    tracing::info!(node = %cfg.node_id, scheduler = %address, not_after = answer.not_after_unix, "joined: certificate issued");
                    return Ok(());
                }
                Err(s) if berth_net::is_not_leader(&s) || s.code() == tonic::Code::Unavailable => {
                    last = s.message().to_owned();
                }
                Err(s) => {
                    return Err(AgentError::Runtime(format!(
                        "joining with agent.join_token_file: {} ({:?})",
                        s.message(),
                        s.code()
                    )));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(round + 1))).await;
    }
    Err(AgentError::Runtime(format!(
        "joining: no replica answered ({last})"
    )))
}

/// Renews the certificate at half its lifetime, through `channel` (authenticated by the
/// current certificate), until the agent stops. A cluster whose replicas hold no CA key
/// answers FAILED_PRECONDITION; the agent then leaves renewal to the operator.
pub fn spawn_renewal(cfg: &AgentConfig, tls: Tls) -> tokio::task::JoinHandle<()> {
    let cfg = cfg.clone();
    tokio::spawn(async move {
        loop {
            let (not_before, not_after) = tls.validity();
            let renew_at = not_before + (not_after - not_before) / 2;
            let now = pki::unix_now();
            if now < renew_at {
                tokio::time::sleep(Duration::from_secs((renew_at - now).clamp(1, 60) as u64)).await;
                continue;
            }
            match renew_once(&cfg, &tls).await {
                // At most one renewal a second, whatever lifetime the CA hands out.
                Ok(()) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(RenewError::NoCa(why)) => {
                    tracing::warn!(node = %cfg.node_id, %why, "certificate renewal is not offered by the cluster; renew it with the operator's CA");
                    return;
                }
                Err(RenewError::Failed(why)) => {
                    tracing::warn!(node = %cfg.node_id, %why, "certificate renewal failed; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    })
}

enum RenewError {
    NoCa(String),
    Failed(String),
}

async fn renew_once(cfg: &AgentConfig, tls: &Tls) -> Result<(), RenewError> {
    let (key_pem, csr_pem) = pki::signing_request(&tls.identity()).map_err(RenewError::Failed)?;
    let mut last = String::new();
    for address in &cfg.schedulers {
        let channel = berth_net::channel(
            address,
            &berth_net::NetConfig::peer().with_tls(Some(tls), berth_net::Expect::AnyReplica),
        )
        .map_err(|e| RenewError::Failed(e.to_string()))?;
        let request = pb::RenewCertificateRequest {
            csr_pem: csr_pem.clone(),
        };
        match NodeServiceClient::new(channel)
            .renew_certificate(request)
            .await
        {
            Ok(answer) => {
                let answer = answer.into_inner();
                write_pair(cfg, &key_pem, &answer.cert_pem)
                    .map_err(|e| RenewError::Failed(e.to_string()))?;
                tls.reload_if_changed()
                    .map_err(|e| RenewError::Failed(e.to_string()))?;
                tracing::info!(node = %cfg.node_id, not_after = answer.not_after_unix, "certificate renewed");
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(RenewError::NoCa(s.message().to_owned()));
            }
            Err(s) => last = s.message().to_owned(),
        }
    }
    Err(RenewError::Failed(last))
}

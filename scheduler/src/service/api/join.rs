//! `NodeService.Join` and `RenewCertificate`: node certificates signed by the cluster CA
//! whose key this replica holds (`scheduler.auth.ca_key`). Join spends a single-use join
//! token through the log (so two replicas can never both accept it); renewal is
//! authenticated by the node's current certificate and names the same node.

use tonic::{Code, Request, Response, Status};

use berth_net::{Identity, Role};
use berth_proto::pb::v1 as pb;

use super::access::{split_token, token_hash};
use super::{NodeApi, check_node_id, only_outcome};
use crate::service::auth::{self, Caller};
use crate::service::{ServiceError, Store};
use crate::state::{Command, ItemOutcome};

/// Largest signing request accepted.
const MAX_CSR_BYTES: usize = 16 << 10;

fn no_ca() -> Status {
    Status::failed_precondition(
        "this cluster's replicas hold no CA key (scheduler.auth.ca_key), so they cannot \
         issue node certificates; the operator's CA issues them",
    )
}

impl<S: Store> NodeApi<S> {
    fn issue(&self, csr_pem: &str, node: &str) -> Result<pb::CertificateResponse, Status> {
        let Some(ca) = self.security.ca.as_ref() else {
            return Err(no_ca());
        };
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(ServiceError::invalid(
                "csr_pem",
                format!("{} bytes; at most {MAX_CSR_BYTES}", csr_pem.len()),
            )
            .into());
        }
        let identity = Identity::new(&self.cluster_id, Role::Node(node.to_owned()));
        let now = berth_net::tls::pki::unix_now();
        let ttl = self.security.node_cert_ttl;
        let cert_pem = ca
            .sign_request(csr_pem, &identity, ttl, now)
            .map_err(|e| ServiceError::invalid("csr_pem", e))?;
        tracing::info!(node, identity = %identity, ttl_s = ttl.as_secs(), "issued a node certificate");
        Ok(pb::CertificateResponse {
            cert_pem,
            ca_pem: ca.cert_pem.clone(),
            not_after_unix: (now + ttl.as_secs() as i64).max(0) as u64,
        })
    }

    pub(super) async fn join_call(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let req = request.into_inner();
        check_node_id("node_id", &req.node_id)?;
        if self.security.ca.is_none() {
            return Err(no_ca());
        }
        let denied =
            |message: String| self.denied(auth::service::NODE, Code::Unauthenticated, message);
        let Some((id, _)) = split_token(&req.token) else {
            return Err(denied(
                "token: not a join token (berth_ID_SECRET, from berth node token create)".into(),
            ));
        };
        let result = self
            .handle
            .command(Command::UseJoinToken {
                id: id.to_owned(),
                hash: token_hash(&req.token),
                node: req.node_id.clone(),
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(denied(format!("token: {r}")));
        }
        Ok(Response::new(self.issue(&req.csr_pem, &req.node_id)?))
    }

    pub(super) async fn renew_call(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let node = match auth::caller(&request) {
            Caller::Cert(Identity {
                role: Role::Node(node),
                ..
            }) => node,
            Caller::Insecure => {
                return Err(Status::failed_precondition(
                    "this replica runs insecure; there is no certificate to renew",
                ));
            }
            _ => {
                return Err(Status::unauthenticated(
                    "RenewCertificate needs the node's current certificate",
                ));
            }
        };
        Ok(Response::new(
            self.issue(&request.get_ref().csr_pem, &node)?,
        ))
    }
}

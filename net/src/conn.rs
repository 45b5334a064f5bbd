//! Connections as berth's servers accept them and its channels dial them: plain TCP when
//! insecure, TLS 1.3 otherwise; either way Nagle is off and the server side knows who the
//! peer is ([`PeerInfo`], in every request's extensions).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::either::Either;
use tonic::transport::server::Connected;

use crate::tls::{ClientTls, Identity, Tls, identity};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once on one listener; past it, new connections wait.
pub const MAX_HANDSHAKES: usize = 1_024;

/// Who is on the other end of a server's connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS (false: the server runs insecure).
    pub tls: bool,
    /// The identity in the client certificate (`None`: no certificate was sent).
    pub identity: Option<Identity>,
    /// A client certificate that chained to the CA but names no usable identity: why.
    pub identity_problem: Option<String>,
}

/// An accepted connection's stream: plain TCP, or TLS over it.
type Io = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// An accepted connection.
pub struct Conn {
    io: Io,
    info: PeerInfo,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn handshake(acceptor: TlsAcceptor, tcp: TcpStream, remote: SocketAddr) -> io::Result<Conn> {
    // A plaintext client (an HTTP/2 preface, not a ClientHello) is served in plaintext so
    // that it gets a gRPC status saying TLS is required, not a reset it cannot explain;
    // every guard refuses a connection whose `tls` is false, before any handler runs.
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no bytes before the timeout"))??;
    if peeked == 1 && first[0] != TLS_HANDSHAKE_RECORD {
        return Ok(Conn {
            io: Either::Left(tcp),
            info: PeerInfo {
                remote: Some(remote),
                tls: false,
                ..PeerInfo::default()
            },
        });
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let mut info = PeerInfo {
        remote: Some(remote),
        tls: true,
        ..PeerInfo::default()
    };
    if let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        match identity::of_certificate(leaf) {
            Ok((id, _)) => info.identity = Some(id),
            Err(why) => info.identity_problem = Some(why),
        }
    }
    Ok(Conn {
        io: Either::Right(Box::new(tls)),
        info,
    })
}

/// The connections `listener` accepts, for `serve_with_incoming`: TLS when `tls` is set
/// (each handshake in its own task, at most [`MAX_HANDSHAKES`] at once, so one slow peer
/// never holds up the others), plain TCP otherwise. A failed handshake is logged at debug
/// and dropped; the listener closes when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Tls>,
) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%remote, error = %e, "set_nodelay");
            }
            let Some(tls) = &tls else {
                let conn = Conn {
                    io: Either::Left(tcp),
                    info: PeerInfo {
                        remote: Some(remote),
                        ..PeerInfo::default()
                    },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match handshake(acceptor, tcp, remote).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Dials `host:port` (from the channel's URI) and, with `tls`, runs the TLS handshake,
/// checking the server's identity.
pub(crate) async fn dial(
    uri: http::Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> io::Result<hyper_util::rt::TokioIo<ClientIo>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the address"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri
        .port_u16()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no port in the address"))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let Some(config) = tls else {
        return Ok(hyper_util::rt::TokioIo::new(Either::Left(tcp)));
    };
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let connector = TlsConnector::from(config);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(hyper_util::rt::TokioIo::new(Either::Right(Box::new(
        stream,
    ))))
}

/// A dialled connection: plain TCP (insecure), or TLS over it.
pub type ClientIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The certificate a TLS server at `address` presents (leaf, DER), checked as a client
/// with `tls` expecting `expect` would. For tests and `berth cert probe`-like checks.
pub async fn peer_certificate(address: &str, tls: ClientTls) -> io::Result<Vec<u8>> {
    let uri: http::Uri =
        format!("http://{address}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| {
                io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
            })?;
    let io = dial(uri, Some(tls.tls.client_config(tls.expect)))
        .await?
        .into_inner();
    match io {
        Either::Right(s) => s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or_else(|| io::Error::other("the server sent no certificate")),
        Either::Left(_) => Err(io::Error::other("not TLS")),
    }
}

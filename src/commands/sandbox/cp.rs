//! `berth sandbox cp SRC DST`: copies a file into or out of a running sandbox, like
//! `docker cp`; one of the two is `ID:PATH` (an absolute path in the sandbox), the other a
//! local path or `-` for stdin/stdout. A destination ending in `/` takes the source's file
//! name. Up to 1 GiB; the sandbox's file is replaced only once all of it has arrived, and
//! a local one is written to a temporary file and renamed.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

/// Bytes per message of an upload.
const CHUNK: usize = 256 * 1024;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Place {
    /// A local path, or `-`.
    Local(String),
    /// A path in a sandbox.
    Sandbox {
        /// Sandbox id.
        id: String,
        /// Absolute path in it.
        path: String,
    },
}

/// Reads `ID:PATH` (the id before the first `:`, a path starting with `/`) or a local path.
pub(super) fn parse_place(s: &str) -> Place {
    match s.split_once(':') {
        Some((id, path)) if id.starts_with("sbx-") && path.starts_with('/') => Place::Sandbox {
            id: id.to_owned(),
            path: path.to_owned(),
        },
        _ => Place::Local(s.to_owned()),
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Copies; `parents` creates missing directories in the sandbox.
pub(super) async fn cp(
    client: &mut Client,
    from: Place,
    to: Place,
    parents: bool,
) -> Result<ExitCode, Status> {
    match (from, to) {
        (Place::Local(local), Place::Sandbox { id, mut path }) => {
            if path.ends_with('/') {
                path.push_str(file_name(&local));
            }
            let n = upload(client, &local, id.clone(), path.clone(), parents).await?;
            eprintln!("copied {n} bytes to {id}:{path}");
        }
        (Place::Sandbox { id, path }, Place::Local(mut local)) => {
            if local.ends_with('/') || Path::new(&local).is_dir() {
                local = format!("{}/{}", local.trim_end_matches('/'), file_name(&path));
            }
            let n = download(client, id.clone(), path.clone(), &local).await?;
            if local != "-" {
                eprintln!("copied {n} bytes from {id}:{path} to {local}");
            }
        }
        _ => {
            return Err(Status::invalid_argument(
                "exactly one of SRC and DST must be ID:PATH (e.g. sbx-0000000001:/tmp/x)",
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn upload(
    client: &mut Client,
    local: &str,
    sandbox_id: String,
    path: String,
    create_parents: bool,
) -> Result<u64, Status> {
    use pb::write_file_request::Message;
    let local_err = |e: std::io::Error| Status::failed_precondition(format!("{local}: {e}"));
    let (mut source, mode): (Box<dyn Read + Send>, u32) = if local == "-" {
        (Box::new(std::io::stdin()), 0o644)
    } else {
        let f = std::fs::File::open(local).map_err(local_err)?;
        let mode = f.metadata().map_err(local_err)?.permissions().mode() & 0o7777;
        (Box::new(f), mode)
    };
    let (tx, rx) = mpsc::channel(4);
    let start = pb::WriteFileRequest {
        message: Some(Message::Start(pb::WriteFileStart {
            sandbox_id,
            path,
            mode,
            create_parents,
        })),
    };
    let _ = tx.send(start).await;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    let m = pb::WriteFileRequest {
                        message: Some(Message::Data(buf[..n].to_vec())),
                    };
                    if tx.blocking_send(m).is_err() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    });
    let answer = client
        .sandbox_service()?
        .write_file(ReceiverStream::new(rx))
        .await;
    // A refusal can come before the whole file was sent; the reader thread then ends on its
    // own when the stream is dropped.
    let written = answer?.into_inner().bytes_written;
    if let Ok(Err(e)) = reader.join() {
        return Err(local_err(e));
    }
    Ok(written)
}

async fn download(
    client: &mut Client,
    sandbox_id: String,
    path: String,
    local: &str,
) -> Result<u64, Status> {
    use pb::read_file_response::Message;
    let mut answers = client
        .sandbox_service()?
        .read_file(pb::ReadFileRequest { sandbox_id, path })
        .await?
        .into_inner();
    let local_err = |e: std::io::Error| Status::failed_precondition(format!("{local}: {e}"));
    let temp = format!("{local}.berth-part");
    let mut sink: Box<dyn Write> = if local == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&temp).map_err(local_err)?)
    };
    let mut mode = 0o644;
    let mut total = 0u64;
    let result = async {
        while let Some(m) = answers.message().await? {
            match m.message {
                Some(Message::Info(i)) => mode = i.mode,
                Some(Message::Data(d)) => {
                    total += d.len() as u64;
                    sink.write_all(&d).map_err(local_err)?;
                }
                None => {}
            }
        }
        sink.flush().map_err(local_err)
    }
    .await;
    drop(sink);
    if local == "-" {
        return result.map(|()| total);
    }
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).map_err(local_err)?;
    std::fs::rename(&temp, local).map_err(local_err)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_a_sandbox_path_only_with_an_id_and_an_absolute_path() {
        assert_eq!(
            parse_place("sbx-0000000007:/tmp/a"),
            Place::Sandbox {
                id: "sbx-0000000007".into(),
                path: "/tmp/a".into()
            }
        );
        assert_eq!(parse_place("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(parse_place("-"), Place::Local("-".into()));
        assert_eq!(file_name("/tmp/dir/x.bin"), "x.bin");
    }
}

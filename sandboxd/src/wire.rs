//! The helper's protocol: length-prefixed frames on one Unix stream per call.
//!
//! A frame is a little-endian `u32` length, then that many bytes: a tag byte and the body.
//! Integers are little-endian, byte strings a `u32` length and the bytes. A call is one
//! connection: the agent sends a request ([`ToHelper::Exec`], `WriteFile`, `ReadFile`,
//! `ListDir`) and what follows it (stdin, file data); the helper answers with
//! [`FromHelper`] frames. Closing the connection ends the call: an exec's process group is
//! killed.

use std::io::{self, Read, Write};

/// Largest frame either side accepts (a chunk plus its header).
pub const MAX_FRAME: usize = CHUNK + 64 * 1024;
/// Largest piece of stdin, output or file data in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Largest file `WriteFile` writes or `ReadFile` reads.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Most entries `ListDir` returns (the rest are counted as left out).
pub const MAX_DIR_ENTRIES: usize = 10_000;
/// Most calls the helper serves at once; past it a call is refused with `Busy`.
pub const MAX_CALLS: usize = 256;

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Winsize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What an exec runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecStart {
    /// argv; the program is looked up on the sandbox's PATH.
    pub argv: Vec<String>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; empty for the sandbox's.
    pub cwd: String,
    /// A terminal of this size instead of pipes.
    pub tty: Option<Winsize>,
    /// Kill it after this long; 0 for no limit.
    pub timeout_ms: u64,
}

/// Agent → helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToHelper {
    /// Start a process.
    Exec(ExecStart),
    /// Bytes for its stdin.
    Stdin(Vec<u8>),
    /// Its stdin ends.
    StdinClose,
    /// The terminal was resized.
    Resize(Winsize),
    /// Write a file; `Data` frames then `End` follow.
    WriteFile {
        /// Absolute path in the sandbox.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Create missing parent directories.
        create_parents: bool,
    },
    /// File contents.
    Data(Vec<u8>),
    /// The file is complete.
    End,
    /// Read a file.
    ReadFile {
        /// Absolute path in the sandbox.
        path: String,
    },
    /// List a directory.
    ListDir {
        /// Absolute path in the sandbox.
        path: String,
    },
    /// Get ready for a checkpoint (the shim's call, before `runsc checkpoint`): end every
    /// other call, stop listening and remove the socket, answer [`FromHelper::Quiesced`] and
    /// close. gVisor cannot save a sandbox holding a host socket. The helper listens again
    /// once the wake file ([`WAKE`] in the socket's directory) appears.
    Quiesce,
    /// Flush the sandbox's file caches to its root (`sync(2)` inside: gVisor writes the
    /// dirty pages it caches back to the host files), answered with [`FromHelper::Synced`].
    /// The agent's call before it reads the write layer for a filesystem snapshot.
    Sync,
}

/// The file in the socket's directory that tells a quiesced helper to listen again.
pub const WAKE: &str = "wake";

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such file, directory or program.
    NotFound,
    /// The path is not allowed (it leaves the root, or is not absolute).
    BadPath,
    /// The sandbox's user may not do it.
    PermissionDenied,
    /// Past a stated size limit.
    TooLarge,
    /// The helper is serving its maximum of calls.
    Busy,
    /// The request did not make sense (a directory to read as a file, a bad frame).
    Invalid,
    /// Anything else.
    Other,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// `f` file, `d` directory, `l` symlink, `o` other.
    pub kind: u8,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, ms since the epoch.
    pub modified_unix_ms: u64,
}

/// Helper → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromHelper {
    /// The exec's process started.
    Started {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// Output on stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Output on stderr.
    Stderr(Vec<u8>),
    /// The process ended.
    Exit {
        /// Exit code; 128 + the signal when killed by one.
        code: i32,
        /// The signal that killed it, or 0.
        signal: i32,
        /// Killed because its timeout passed.
        timed_out: bool,
    },
    /// The call failed.
    Error {
        /// Class.
        kind: ErrorKind,
        /// In words, naming the path or program.
        message: String,
    },
    /// File contents; the first frame of a read carries the size.
    FileData(Vec<u8>),
    /// A read starts: the file's size and mode.
    FileInfo {
        /// Size in bytes.
        size: u64,
        /// Permission bits.
        mode: u32,
    },
    /// The read is complete.
    FileEnd,
    /// A write is complete.
    Written {
        /// Bytes written.
        bytes: u64,
    },
    /// A directory's entries.
    Entries {
        /// Entries, by name.
        entries: Vec<DirEntry>,
        /// How many more there were.
        left_out: u64,
    },
    /// Every other call has ended and the socket is gone: the sandbox can be checkpointed.
    Quiesced {
        /// Calls that were cut off.
        ended_calls: u32,
    },
    /// `sync(2)` returned: what the sandbox wrote is in its root on the host.
    Synced,
}

/// A frame: the body behind its length. Bodies are at most [`MAX_FRAME`] (a chunk and a
/// header), far below `u32::MAX`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    w.write_all(&frame(body))
}

/// Reads one frame's body; `Ok(None)` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// A frame header's length, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(invalid(&format!("frame of {len} bytes")));
    }
    Ok(len)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn tag(t: u8) -> Enc {
        Enc(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u32(v.len() as u32);
        s.0.extend_from_slice(v);
        s
    }
    fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("frame ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| invalid("a string is not UTF-8"))
    }
    fn bool(&mut self) -> io::Result<bool> {
        Ok(self.u8()? != 0)
    }
    fn count(&mut self, max: usize) -> io::Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(invalid("too many entries"));
        }
        Ok(n)
    }
    fn done<T>(self, v: T) -> io::Result<T> {
        if self.0.is_empty() {
            Ok(v)
        } else {
            Err(invalid("trailing bytes in a frame"))
        }
    }
}

impl ToHelper {
    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ToHelper::Exec(s) => {
                let mut e = Enc::tag(1).u32(s.argv.len() as u32);
                for a in &s.argv {
                    e = e.str(a);
                }
                e = e.u32(s.env.len() as u32);
                for (k, v) in &s.env {
                    e = e.str(k).str(v);
                }
                e = e.str(&s.cwd);
                e = match s.tty {
                    Some(w) => e.u8(1).u16(w.rows).u16(w.cols),
                    None => e.u8(0),
                };
                e.u64(s.timeout_ms).0
            }
            ToHelper::Stdin(d) => Enc::tag(2).bytes(d).0,
            ToHelper::StdinClose => Enc::tag(3).0,
            ToHelper::Resize(w) => Enc::tag(4).u16(w.rows).u16(w.cols).0,
            ToHelper::WriteFile {
                path,
                mode,
                create_parents,
            } => Enc::tag(5).str(path).u32(*mode).u8(*create_parents as u8).0,
            ToHelper::Data(d) => Enc::tag(6).bytes(d).0,
            ToHelper::End => Enc::tag(7).0,
            ToHelper::ReadFile { path } => Enc::tag(8).str(path).0,
            ToHelper::ListDir { path } => Enc::tag(9).str(path).0,
            ToHelper::Quiesce => Enc::tag(10).0,
            ToHelper::Sync => Enc::tag(11).0,
        }
    }

    /// Reads a frame body.
    pub fn decode(body: &[u8]) -> io::Result<ToHelper> {
        let mut d = Dec(body);
        let v = match d.u8()? {
            1 => {
                let n = d.count(4096)?;
                let argv = (0..n).map(|_| d.str()).collect::<io::Result<_>>()?;
                let n = d.count(4096)?;
                let env = (0..n)
                    .map(|_| Ok((d.str()?, d.str()?)))
                    .collect::<io::Result<_>>()?;
                let cwd = d.str()?;
                let tty = if d.bool()? {
                    Some(Winsize {
                        rows: d.u16()?,
                        cols: d.u16()?,
                    })
                } else {
                    None
                };
                ToHelper::Exec(ExecStart {
                    argv,
                    env,
                    cwd,
                    tty,
                    timeout_ms: d.u64()?,
                })
            }
            2 => ToHelper::Stdin(d.bytes()?),
            3 => ToHelper::StdinClose,
            4 => ToHelper::Resize(Winsize {
                rows: d.u16()?,
                cols: d.u16()?,
            }),
            5 => ToHelper::WriteFile {
                path: d.str()?,
                mode: d.u32()?,
                create_parents: d.bool()?,
            },
            6 => ToHelper::Data(d.bytes()?),
            7 => ToHelper::End,
            8 => ToHelper::ReadFile { path: d.str()? },
            9 => ToHelper::ListDir { path: d.str()? },
            10 => ToHelper::Quiesce,
            11 => ToHelper::Sync,
            t => return Err(invalid(&format!("unknown request tag {t}"))),
        };
        d.done(v)
    }
}

impl ErrorKind {
    fn code(self) -> u8 {
        match self {
            ErrorKind::NotFound => 1,
            ErrorKind::BadPath => 2,
            ErrorKind::PermissionDenied => 3,
            ErrorKind::TooLarge => 4,
            ErrorKind::Busy => 5,
            ErrorKind::Invalid => 6,
            ErrorKind::Other => 7,
        }
    }

    fn from_code(c: u8) -> ErrorKind {
        match c {
            1 => ErrorKind::NotFound,
            2 => ErrorKind::BadPath,
            3 => ErrorKind::PermissionDenied,
            4 => ErrorKind::TooLarge,
            5 => ErrorKind::Busy,
            6 => ErrorKind::Invalid,
            _ => ErrorKind::Other,
        }
    }

    /// The class of an I/O error.
    pub fn of(e: &io::Error) -> ErrorKind {
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                ErrorKind::PermissionDenied
            }
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::Invalid,
            _ => ErrorKind::Other,
        }
    }
}

impl FromHelper {
    /// The frame body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            FromHelper::Started { pid } => Enc::tag(20).u32(*pid).0,
            FromHelper::Stdout(d) => Enc::tag(21).bytes(d).0,
            FromHelper::Stderr(d) => Enc::tag(22).bytes(d).0,
            FromHelper::Exit {
                code,
                signal,
                timed_out,
            } => {
                Enc::tag(23)
                    .u32(*code as u32)
                    .u32(*signal as u32)
                    .u8(*timed_out as u8)
                    .0
            }
            FromHelper::Error { kind, message } => Enc::tag(24).u8(kind.code()).str(message).0,
            FromHelper::FileData(d) => Enc::tag(25).bytes(d).0,
            FromHelper::FileInfo { size, mode } => Enc::tag(26).u64(*size).u32(*mode).0,
            FromHelper::FileEnd => Enc::tag(27).0,
            FromHelper::Written { bytes } => Enc::tag(28).u64(*bytes).0,
            FromHelper::Entries { entries, left_out } => {
                let mut e = Enc::tag(29).u64(*left_out).u32(entries.len() as u32);
                for x in entries {
                    e = e
                        .str(&x.name)
                        .u8(x.kind)
                        .u64(x.size)
                        .u32(x.mode)
                        .u64(x.modified_unix_ms);
                }
                e.0
            }
            FromHelper::Quiesced { ended_calls } => Enc::tag(30).u32(*ended_calls).0,
            FromHelper::Synced => Enc::tag(31).0,
        }
    }

    /// Reads a frame body.
    pub fn decode(body: &[u8]) -> io::Result<FromHelper> {
        let mut d = Dec(body);
        let v = match d.u8()? {
            20 => FromHelper::Started { pid: d.u32()? },
            21 => FromHelper::Stdout(d.bytes()?),
            22 => FromHelper::Stderr(d.bytes()?),
            23 => FromHelper::Exit {
                code: d.u32()? as i32,
                signal: d.u32()? as i32,
                timed_out: d.bool()?,
            },
            24 => FromHelper::Error {
                kind: ErrorKind::from_code(d.u8()?),
                message: d.str()?,
            },
            25 => FromHelper::FileData(d.bytes()?),
            26 => FromHelper::FileInfo {
                size: d.u64()?,
                mode: d.u32()?,
            },
            27 => FromHelper::FileEnd,
            28 => FromHelper::Written { bytes: d.u64()? },
            29 => {
                let left_out = d.u64()?;
                let n = d.count(MAX_DIR_ENTRIES)?;
                let entries = (0..n)
                    .map(|_| {
                        Ok(DirEntry {
                            name: d.str()?,
                            kind: d.u8()?,
                            size: d.u64()?,
                            mode: d.u32()?,
                            modified_unix_ms: d.u64()?,
                        })
                    })
                    .collect::<io::Result<_>>()?;
                FromHelper::Entries { entries, left_out }
            }
            30 => FromHelper::Quiesced {
                ended_calls: d.u32()?,
            },
            31 => FromHelper::Synced,
            t => return Err(invalid(&format!("unknown answer tag {t}"))),
        };
        d.done(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_a_round_trip() {
        let requests = [
            ToHelper::Exec(ExecStart {
                argv: vec!["sh".into(), "-c".into(), "echo é".into()],
                env: vec![("A".into(), "1".into())],
                cwd: "/work".into(),
                tty: Some(Winsize { rows: 24, cols: 80 }),
                timeout_ms: 1500,
            }),
            ToHelper::Stdin(b"abc".to_vec()),
            ToHelper::StdinClose,
            ToHelper::Resize(Winsize { rows: 1, cols: 2 }),
            ToHelper::WriteFile {
                path: "/a/b".into(),
                mode: 0o640,
                create_parents: true,
            },
            ToHelper::Data(vec![0; 10]),
            ToHelper::End,
            ToHelper::ReadFile { path: "/x".into() },
            ToHelper::ListDir { path: "/".into() },
            ToHelper::Quiesce,
            ToHelper::Sync,
        ];
        for r in requests {
            assert_eq!(ToHelper::decode(&r.encode()).expect("decodes"), r);
        }
        let answers = [
            FromHelper::Started { pid: 7 },
            FromHelper::Stdout(b"out".to_vec()),
            FromHelper::Stderr(Vec::new()),
            FromHelper::Exit {
                code: -1,
                signal: 9,
                timed_out: true,
            },
            FromHelper::Error {
                kind: ErrorKind::BadPath,
                message: "no".into(),
            },
            FromHelper::FileData(vec![1, 2]),
            FromHelper::FileInfo {
                size: 3,
                mode: 0o755,
            },
            FromHelper::FileEnd,
            FromHelper::Written { bytes: 9 },
            FromHelper::Entries {
                entries: vec![DirEntry {
                    name: "f".into(),
                    kind: b'f',
                    size: 1,
                    mode: 0o644,
                    modified_unix_ms: 5,
                }],
                left_out: 2,
            },
            FromHelper::Quiesced { ended_calls: 3 },
            FromHelper::Synced,
        ];
        for a in answers {
            assert_eq!(FromHelper::decode(&a.encode()).expect("decodes"), a);
        }
    }

    #[test]
    fn short_or_trailing_or_oversized_frames_are_errors_not_panics() {
        let body = ToHelper::ReadFile { path: "/x".into() }.encode();
        for cut in 0..body.len() {
            assert!(ToHelper::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(ToHelper::decode(&long).is_err());
        assert!(ToHelper::decode(&[200]).is_err());
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert!(frame_len(0u32.to_le_bytes()).is_err());
        let mut framed = Vec::new();
        write_frame(&mut framed, &body).expect("write");
        let mut r = &framed[..];
        assert_eq!(read_frame(&mut r).expect("read"), Some(body));
        assert_eq!(read_frame(&mut r).expect("eof"), None);
    }
}

//! A minimal client of QEMU's monitor protocol (QMP): greeting, capability negotiation, and
//! synchronous commands. Asynchronous events arriving in between are skipped.
//!
//! Written by hand: QMP needs three JSON lines here, and the QMP crates pull in an async
//! stack and QEMU's whole schema for them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{Error, Result};

#[derive(Debug)]
pub(crate) struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capability-negotiation mode.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let err = |what: String| Error::Qmp {
            socket: socket.to_path_buf(),
            what,
        };
        let stream = UnixStream::connect(socket).map_err(|e| err(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| err(format!("set timeout: {e}")))?;
        let writer = stream.try_clone().map_err(|e| err(format!("clone: {e}")))?;
        let mut qmp = Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn error(&self, what: String) -> Error {
        Error::Qmp {
            socket: self.socket.clone(),
            what,
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| self.error(format!("read: {e}")))?;
        if n == 0 {
            return Err(self.error("QEMU closed the monitor connection".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.error(format!("bad JSON {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        let mut req = serde_json::to_vec(&json!({ "execute": command })).expect("static JSON");
        req.push(b'\n');
        self.writer
            .write_all(&req)
            .map_err(|e| self.error(format!("send {command}: {e}")))?;
        loop {
            let msg = self.read_message()?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(self.error(format!("{command}: {e}")));
            }
            // {"event": ...}: not ours, keep reading.
        }
    }
}

//! The row messages of PostgreSQL's `pgoutput` logical decoding protocol (version 1), as
//! they arrive in the WAL stream's `XLogData` (pgwire-replication decodes Begin, Commit and
//! Message itself). Pure parsing: no I/O, every length checked, a malformed message is an
//! error, never a panic.
//! Reference: PostgreSQL docs, "Logical Replication Message Formats".

use std::fmt;

/// One column of a relation, as the Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID (`pg_type.oid`).
    pub type_oid: u32,
}

/// A column value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the UPDATE did not change: not sent, take it from the old row.
    UnchangedToast,
    /// The value's text form.
    Text(String),
}

/// A decoded row message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Describes a relation before its first row in this session (and after DDL).
    Relation {
        /// `pg_class.oid`.
        id: u32,
        /// Schema name.
        namespace: String,
        /// Table name.
        name: String,
        /// Columns in table order (dropped columns are not sent).
        columns: Vec<Column>,
    },
    /// A new row.
    Insert {
        /// Relation.
        rel: u32,
        /// The row.
        new: Vec<Value>,
    },
    /// A changed row; `old` is present with REPLICA IDENTITY FULL (or a changed key).
    Update {
        /// Relation.
        rel: u32,
        /// The row before (identity columns only unless FULL).
        old: Option<Vec<Value>>,
        /// The row after.
        new: Vec<Value>,
    },
    /// A deleted row (identity columns only unless REPLICA IDENTITY FULL).
    Delete {
        /// Relation.
        rel: u32,
        /// The row before.
        old: Vec<Value>,
    },
    /// TRUNCATE of one or more relations.
    Truncate {
        /// Relations.
        rels: Vec<u32>,
    },
    /// Anything else (Type, Origin, …): nothing to capture.
    Other(u8),
}

/// A message that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

impl std::error::Error for ParseError {}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError(format!("truncated {what}")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self, what: &str) -> Result<String, ParseError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ParseError(format!("{what} without its terminating zero")))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, ParseError> {
        let n = self.u16("column count")?;
        // Each column takes at least one byte: a count beyond that is a lie.
        if usize::from(n) > self.buf.len() {
            return Err(ParseError("column count beyond the message".into()));
        }
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            values.push(match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.u32("value length")? as usize;
                    let bytes = self.take(len, "value")?;
                    Value::Text(String::from_utf8_lossy(bytes).into_owned())
                }
                b'b' => return Err(ParseError("binary value (binary mode is not used)".into())),
                other => return Err(ParseError(format!("column kind {other:#x}"))),
            });
        }
        Ok(values)
    }
}

/// Parses one `XLogData` payload.
pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    let mut r = Reader { buf: data };
    let tag = r.u8("tag")?;
    match tag {
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let _replica_identity = r.u8("replica identity")?;
            let n = r.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(n).min(1600));
            for _ in 0..n {
                let _flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                let _typmod = r.u32("column typmod")?;
                columns.push(Column { name, type_oid });
            }
            Ok(Message::Relation {
                id,
                namespace,
                name,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'N' => Ok(Message::Insert {
                    rel,
                    new: r.tuple()?,
                }),
                other => Err(ParseError(format!("insert tuple marker {other:#x}"))),
            }
        }
        b'U' => {
            let rel = r.u32("relation id")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(ParseError(format!("update tuple marker {marker:#x}")));
            }
            Ok(Message::Update {
                rel,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let rel = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'K' | b'O' => Ok(Message::Delete {
                    rel,
                    old: r.tuple()?,
                }),
                other => Err(ParseError(format!("delete tuple marker {other:#x}"))),
            }
        }
        b'T' => {
            let n = r.u32("relation count")? as usize;
            if n > r.buf.len() / 4 + 1 {
                return Err(ParseError("relation count beyond the message".into()));
            }
            let _options = r.u8("truncate options")?;
            let mut rels = Vec::with_capacity(n);
            for _ in 0..n {
                rels.push(r.u32("relation id")?);
            }
            Ok(Message::Truncate { rels })
        }
        other => Ok(Message::Other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> Vec<u8> {
        let mut b = vec![b't'];
        b.extend((v.len() as u32).to_be_bytes());
        b.extend(v.as_bytes());
        b
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => b.extend(text(v)),
                None => b.push(b'n'),
            }
        }
        b
    }

    #[test]
    fn relation_and_rows() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"public\0citas\0");
        rel.push(b'f');
        rel.extend(2u16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("negocio_id", 25)] {
            rel.push(1);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        assert_eq!(
            parse(&rel).unwrap(),
            Message::Relation {
                id: 16384,
                namespace: "public".into(),
                name: "citas".into(),
                columns: vec![
                    Column {
                        name: "id".into(),
                        type_oid: 20
                    },
                    Column {
                        name: "negocio_id".into(),
                        type_oid: 25
                    },
                ],
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16384u32.to_be_bytes());
        upd.push(b'O');
        upd.extend(tuple(&[Some("1"), Some("t1")]));
        upd.push(b'N');
        let mut new = tuple(&[Some("1"), None]);
        new.push(b'u');
        new[1] = 3; // three columns: the third unchanged TOAST
        upd.extend(new);
        assert_eq!(
            parse(&upd).unwrap(),
            Message::Update {
                rel: 16384,
                old: Some(vec![Value::Text("1".into()), Value::Text("t1".into())]),
                new: vec![Value::Text("1".into()), Value::Null, Value::UnchangedToast],
            }
        );

        let mut trunc = vec![b'T'];
        trunc.extend(2u32.to_be_bytes());
        trunc.push(0);
        trunc.extend(1u32.to_be_bytes());
        trunc.extend(2u32.to_be_bytes());
        assert_eq!(
            parse(&trunc).unwrap(),
            Message::Truncate { rels: vec![1, 2] }
        );
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        let mut big = vec![b'I'];
        big.extend(1u32.to_be_bytes());
        big.push(b'N');
        big.extend(u16::MAX.to_be_bytes());
        assert!(parse(&big).is_err());
        let mut long = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        long.extend(u32::MAX.to_be_bytes());
        assert!(parse(&long).is_err());
        assert!(parse(b"R\0\0\0\x01public").is_err());
        assert!(parse(&[]).is_err());
        let mut t = vec![b'T'];
        t.extend(u32::MAX.to_be_bytes());
        assert!(parse(&t).is_err());
        assert_eq!(parse(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }
}

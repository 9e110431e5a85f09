//! Stage parameters: a small typed value tree with one canonical byte encoding.
//!
//! Parameters come from `pipeline.toml`, are overridden by a profile and by `--set`, and end up
//! in two places: the stage key (canonically encoded: sorted keys, floats by bit pattern, every
//! field tagged and length-prefixed) and the manifest (as plain JSON, so `why` can diff them).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One parameter value. Tables are sorted by key so that equal parameter sets encode equally.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Param>),
    Table(BTreeMap<String, Param>),
}

/// The parameters of one stage, sorted by name.
pub type Params = BTreeMap<String, Param>;

impl Param {
    /// Converts a TOML value; datetimes have no meaning as parameters and are rejected.
    pub fn from_toml(value: &toml::Value) -> Result<Param, String> {
        Ok(match value {
            toml::Value::Boolean(b) => Param::Bool(*b),
            toml::Value::Integer(i) => Param::Int(*i),
            toml::Value::Float(f) => Param::Float(*f),
            toml::Value::String(s) => Param::Str(s.clone()),
            toml::Value::Array(items) => Param::List(
                items
                    .iter()
                    .map(Param::from_toml)
                    .collect::<Result<_, _>>()?,
            ),
            toml::Value::Table(table) => Param::Table(
                table
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Param::from_toml(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            toml::Value::Datetime(d) => {
                return Err(format!("datetime {d} is not a valid parameter value"))
            }
        })
    }

    /// Parses the VALUE of `--set STAGE.PARAM=VALUE`: a TOML literal (`5`, `1e-3`, `true`,
    /// `"text"`, `[1, 2]`), or, failing that, the raw text as a string (so paths need no quotes).
    pub fn parse_cli(text: &str) -> Param {
        let doc = format!("v = {text}");
        match doc.parse::<toml::Table>() {
            Ok(table) => table
                .get("v")
                .and_then(|v| Param::from_toml(v).ok())
                .unwrap_or_else(|| Param::Str(text.to_string())),
            Err(_) => Param::Str(text.to_string()),
        }
    }

    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Param::Bool(_) => "bool",
            Param::Int(_) => "integer",
            Param::Float(_) => "float",
            Param::Str(_) => "string",
            Param::List(_) => "list",
            Param::Table(_) => "table",
        }
    }

    /// Makes an override take the declared parameter's type: an integer given for a float
    /// parameter becomes a float; any other change of type is an error.
    pub fn coerce_to(self, declared: &Param) -> Result<Param, String> {
        match (declared, self) {
            (Param::Float(_), Param::Int(i)) => Ok(Param::Float(i as f64)),
            (Param::Str(_), Param::Int(i)) => Ok(Param::Str(i.to_string())),
            (Param::Str(_), Param::Float(f)) => Ok(Param::Str(f.to_string())),
            (Param::Str(_), Param::Bool(b)) => Ok(Param::Str(b.to_string())),
            (d, v) if std::mem::discriminant(d) == std::mem::discriminant(&v) => Ok(v),
            (d, v) => Err(format!(
                "expected a {}, got the {} {v}",
                d.type_name(),
                v.type_name()
            )),
        }
    }

    /// Appends the canonical encoding: a one-byte tag, then a fixed-width or length-prefixed body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Param::Bool(b) => {
                out.push(b'b');
                out.push(*b as u8);
            }
            Param::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(&i.to_le_bytes());
            }
            Param::Float(f) => {
                out.push(b'f');
                // By bit pattern: 0.1 written two ways is still one key; -0.0 and 0.0 differ.
                out.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Param::Str(s) => {
                out.push(b's');
                encode_bytes(s.as_bytes(), out);
            }
            Param::List(items) => {
                out.push(b'l');
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| item.encode(out));
            }
            Param::Table(table) => {
                out.push(b't');
                encode_table(table, out);
            }
        }
    }
}

/// Canonical encoding of a sorted table (BTreeMap iterates in key order).
pub fn encode_table(table: &BTreeMap<String, Param>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(table.len() as u64).to_le_bytes());
    for (key, value) in table {
        encode_bytes(key.as_bytes(), out);
        value.encode(out);
    }
}

/// Length-prefixed bytes: no two different sequences of fields can encode to the same bytes.
pub fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Bool(b) => write!(f, "{b}"),
            Param::Int(i) => write!(f, "{i}"),
            Param::Float(x) => write!(f, "{x:?}"),
            Param::Str(s) => write!(f, "{s:?}"),
            Param::List(items) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
            Param::Table(t) => write!(f, "{}", serde_json::to_string(t).unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(p: &Param) -> Vec<u8> {
        let mut out = Vec::new();
        p.encode(&mut out);
        out
    }

    #[test]
    fn floats_encode_by_bit_pattern() {
        assert_eq!(
            encoded(&Param::Float(0.1)),
            encoded(&Param::parse_cli("1e-1"))
        );
        assert_ne!(encoded(&Param::Float(0.0)), encoded(&Param::Float(-0.0)));
    }

    #[test]
    fn strings_and_lists_cannot_collide() {
        let a = Param::List(vec![Param::Str("ab".into()), Param::Str("c".into())]);
        let b = Param::List(vec![Param::Str("a".into()), Param::Str("bc".into())]);
        assert_ne!(encoded(&a), encoded(&b));
    }

    #[test]
    fn cli_values_parse_as_toml_then_fall_back_to_text() {
        assert_eq!(Param::parse_cli("5"), Param::Int(5));
        assert_eq!(Param::parse_cli("true"), Param::Bool(true));
        assert_eq!(
            Param::parse_cli("/data/mnist"),
            Param::Str("/data/mnist".into())
        );
        assert_eq!(Param::parse_cli("\"x y\""), Param::Str("x y".into()));
    }

    #[test]
    fn coercion_keeps_declared_type() {
        assert_eq!(
            Param::Int(3).coerce_to(&Param::Float(1.0)),
            Ok(Param::Float(3.0))
        );
        assert!(Param::Str("x".into()).coerce_to(&Param::Int(1)).is_err());
    }
}

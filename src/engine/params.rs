//! Stage parameters: a small typed value tree with one canonical byte encoding, and the typed
//! view every stage kind declares over it.
//!
//! Parameters come from `pipeline.toml`, are overridden by a profile and by `--set`, and end up
//! in two places: the stage key (canonically encoded: sorted keys, floats by bit pattern, every
//! field tagged and length-prefixed) and the manifest (as plain JSON, so `why` can diff them).
//!
//! Each stage kind reads them through its own serde struct ([`StageParams`]: unknown fields
//! rejected, enums for closed sets of strings, range checks in [`StageParams::check`]).
//! `Pipeline::load` parses every stage of the active profile through it, so a bad value is a
//! [`ParamError`] before anything runs, not a failure an hour into training.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
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

/// A stage kind's parameters, parsed from [`Params`] (without `seed`, which the engine owns).
/// Most kinds declare a serde struct ([`TypedParams`]); a kind whose params fall into parts
/// (e.g. a model's and a sweep's) can parse each part itself.
pub trait StageParams: Sized {
    fn from_params(params: &Params) -> Result<Self, ParamError>;
}

/// A serde struct of parameters: `#[serde(deny_unknown_fields)]`, enums for closed sets of
/// strings, and `check` for the range checks serde cannot express.
pub trait TypedParams: DeserializeOwned {
    fn check(&self) -> Result<(), ParamError> {
        Ok(())
    }
}

impl<T: TypedParams> StageParams for T {
    fn from_params(params: &Params) -> Result<T, ParamError> {
        let typed: T = deserialize_params(params)?;
        typed.check()?;
        Ok(typed)
    }
}

/// A parameter that is wrong: which one and why (the engine adds where it was set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    /// The parameter's name (its path for nested values, e.g. `grid_w_adv[1]`).
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> ParamError {
        ParamError {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "param {}: {}", self.param, self.message)
    }
}

impl std::error::Error for ParamError {}

/// Parses `params` (all but `seed`) into the kind's parameters, checked.
pub fn parse_params<T: StageParams>(params: &Params) -> Result<T, ParamError> {
    let mut without_seed = params.clone();
    without_seed.remove("seed");
    T::from_params(&without_seed)
}

/// Deserialises `params` into `T`; an error names the parameter (its path for nested values).
pub fn deserialize_params<T: DeserializeOwned>(params: &Params) -> Result<T, ParamError> {
    let value = serde_json::to_value(params).map_err(|e| ParamError::new("?", e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names an unknown or missing field in its message, not in the path.
        let param = match field_in_message(&inner) {
            Some(field) if path == "." => field,
            _ => path,
        };
        ParamError::new(param, inner)
    })
}

/// Splits `params` into those whose name starts with `prefix` (with the prefix removed) and
/// the rest: for kinds whose params fall into parts (`probe_width` → a probe's `width`).
pub fn split_prefixed(params: &Params, prefix: &str) -> (Params, Params) {
    let (mut prefixed, mut rest) = (Params::new(), Params::new());
    for (name, value) in params {
        match name.strip_prefix(prefix) {
            Some(stripped) => prefixed.insert(stripped.to_string(), value.clone()),
            None => rest.insert(name.clone(), value.clone()),
        };
    }
    (prefixed, rest)
}

/// The field a serde message quotes first (`unknown field `x`, expected ...`).
fn field_in_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// The parameters of a stage kind that has none.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

impl TypedParams for NoParams {}

/// A count of examples where 0 means "all of them": the one meaning of every `*_limit`
/// parameter. Negative values are rejected when the pipeline loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Limit(usize);

impl Limit {
    /// All examples.
    pub const ALL: Limit = Limit(0);

    /// How many of `available` examples to use.
    pub fn of(self, available: usize) -> usize {
        if self.0 == 0 {
            available
        } else {
            available.min(self.0)
        }
    }

    /// The raw value (0 = all), for code that resolves it later.
    pub fn raw(self) -> usize {
        self.0
    }
}

impl TryFrom<i64> for Limit {
    type Error = String;
    fn try_from(value: i64) -> Result<Limit, String> {
        usize::try_from(value)
            .map(Limit)
            .map_err(|_| format!("{value} is not a count (0 means all, otherwise at least 1)"))
    }
}

impl From<Limit> for i64 {
    fn from(limit: Limit) -> i64 {
        limit.0 as i64
    }
}

/// `value >= min`, else an error naming `param`.
pub fn at_least<T: PartialOrd + fmt::Display>(
    param: &str,
    value: T,
    min: T,
) -> Result<(), ParamError> {
    if value >= min {
        Ok(())
    } else {
        Err(ParamError::new(
            param,
            format!("{value} is out of range: must be at least {min}"),
        ))
    }
}

/// `value > 0` and finite, else an error naming `param` (learning rates).
pub fn positive(param: &str, value: f64) -> Result<(), ParamError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ParamError::new(
            param,
            format!("{value} is out of range: must be a finite number above 0"),
        ))
    }
}

/// `0 <= value < 1` (dropout rates), else an error naming `param`.
pub fn probability(param: &str, value: f64) -> Result<(), ParamError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(ParamError::new(
            param,
            format!("{value} is out of range: must be in [0, 1)"),
        ))
    }
}

/// `value >= 0` and finite (loss weights), else an error naming `param`.
pub fn non_negative(param: &str, value: f64) -> Result<(), ParamError> {
    if value >= 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ParamError::new(
            param,
            format!("{value} is out of range: must be a finite number ≥ 0"),
        ))
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

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Toy {
        #[allow(dead_code)]
        mode: ToyMode,
        levels: usize,
        limit: Limit,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum ToyMode {
        Adam,
        Adamax,
    }

    impl TypedParams for Toy {
        fn check(&self) -> Result<(), ParamError> {
            at_least("levels", self.levels, 1)
        }
    }

    fn toy(pairs: &[(&str, Param)]) -> Result<Toy, ParamError> {
        parse_params(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn typed_params_name_the_param_and_the_allowed_values() {
        let ok = [
            ("mode", Param::Str("adam".into())),
            ("levels", Param::Int(3)),
            ("limit", Param::Int(0)),
            ("seed", Param::Int(4)),
        ];
        let parsed = toy(&ok).unwrap();
        assert_eq!(parsed.limit.of(60_000), 60_000);
        let mut bad = ok.clone();
        bad[0].1 = Param::Str("adamw".into());
        let e = toy(&bad).unwrap_err();
        assert_eq!(e.param, "mode");
        assert!(
            e.message.contains("adamw") && e.message.contains("adamax"),
            "{e}"
        );
        let mut zero = ok.clone();
        zero[1].1 = Param::Int(0);
        let e = toy(&zero).unwrap_err();
        assert_eq!(e.param, "levels");
        assert!(e.message.contains("at least 1"), "{e}");
        let mut negative = ok.clone();
        negative[2].1 = Param::Int(-1);
        let e = toy(&negative).unwrap_err();
        assert_eq!(e.param, "limit");
        assert!(e.message.contains("0 means all"), "{e}");
        let mut extra = ok.to_vec();
        extra.push(("levles", Param::Int(2)));
        let e = toy(&extra).unwrap_err();
        assert_eq!(e.param, "levles");
        let e = toy(&ok[1..]).unwrap_err();
        assert_eq!(e.param, "mode");
        assert!(e.message.contains("missing"), "{e}");
    }

    #[test]
    fn a_limit_of_zero_means_all_and_otherwise_caps() {
        assert_eq!(Limit::ALL.of(7), 7);
        assert_eq!(Limit::try_from(5).unwrap().of(7), 5);
        assert_eq!(Limit::try_from(50).unwrap().of(7), 7);
        assert!(Limit::try_from(-1).is_err());
    }
}

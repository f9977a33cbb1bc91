//! Reading `config.json` keys as transformers' configuration classes do: every spelling a key
//! has (the class's field and its `attribute_map` aliases), the class's default when the key is
//! absent, and an error naming the key when its value has the wrong type or two spellings
//! disagree.

use serde_json::Value;

/// One config object (the top level, or a nested `text_config` / `ffn_config`).
#[derive(Clone, Copy)]
pub(crate) struct Keys<'a> {
    v: &'a Value,
    /// Where the object sits, for messages: `""` or `"text_config."`.
    pub path: &'static str,
}

/// What a key holds.
enum Field<'a> {
    Absent,
    Null(&'a str),
    Value(&'a str, &'a Value),
}

pub(crate) type KeyResult<T> = Result<T, String>;

impl<'a> Keys<'a> {
    pub fn new(v: &'a Value, path: &'static str) -> Self {
        Keys { v, path }
    }

    /// The nested object `name` (absent or null: `None`); an error when it is not an object.
    pub fn object(&self, name: &str, path: &'static str) -> KeyResult<Option<Keys<'a>>> {
        match self.v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(o @ Value::Object(_)) => Ok(Some(Keys { v: o, path })),
            Some(other) => Err(format!("{}{name} is {other}, not an object", self.path)),
        }
    }

    /// The first spelling of `names` that is present; errors when two present spellings differ.
    fn field(&self, names: &[&'a str]) -> KeyResult<Field<'a>> {
        let mut found: Option<(&str, &Value)> = None;
        for &n in names {
            if let Some(v) = self.v.get(n) {
                match found {
                    Some((m, w)) if w != v => {
                        return Err(format!(
                            "{p}{m} = {w} and {p}{n} = {v} are two spellings of one setting and disagree",
                            p = self.path
                        ));
                    }
                    Some(_) => {}
                    None => found = Some((n, v)),
                }
            }
        }
        Ok(match found {
            None => Field::Absent,
            Some((n, Value::Null)) => Field::Null(n),
            Some((n, v)) => Field::Value(n, v),
        })
    }

    fn wrong(&self, key: &str, v: &Value, want: &str) -> String {
        format!("{}{key} = {v} is not {want}", self.path)
    }

    /// A non-negative integer that may be null (`None`); `default` when absent.
    pub fn opt_usize(&self, names: &[&'a str], default: Option<usize>) -> KeyResult<Option<usize>> {
        match self.field(names)? {
            Field::Absent => Ok(default),
            Field::Null(_) => Ok(None),
            Field::Value(k, v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(k, v, "a non-negative integer")),
        }
    }

    /// A non-negative integer; `default` when absent (`None`: the key is required).
    pub fn usize(&self, names: &[&'a str], default: Option<usize>) -> KeyResult<usize> {
        self.opt_usize(names, default)?.ok_or_else(|| self.missing(names))
    }

    /// An integer that may be negative (ERNIE's `moe_layer_end_index = -1`).
    pub fn i64(&self, names: &[&'a str], default: i64) -> KeyResult<i64> {
        match self.field(names)? {
            Field::Absent => Ok(default),
            Field::Null(k) => Err(format!("{}{k} is null", self.path)),
            Field::Value(k, v) => v.as_i64().ok_or_else(|| self.wrong(k, v, "an integer")),
        }
    }

    /// A number (integers accepted) that may be null; `default` when absent.
    pub fn opt_f64(&self, names: &[&'a str], default: Option<f64>) -> KeyResult<Option<f64>> {
        match self.field(names)? {
            Field::Absent => Ok(default),
            Field::Null(_) => Ok(None),
            Field::Value(k, v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(k, v, "a number")),
        }
    }

    /// A number; `default` when absent.
    pub fn f64(&self, names: &[&'a str], default: Option<f64>) -> KeyResult<f64> {
        self.opt_f64(names, default)?.ok_or_else(|| self.missing(names))
    }

    /// A boolean; `default` when absent (null reads as false, as Python's truth value of None).
    pub fn bool(&self, names: &[&'a str], default: bool) -> KeyResult<bool> {
        match self.field(names)? {
            Field::Absent => Ok(default),
            Field::Null(_) => Ok(false),
            Field::Value(k, v) => v.as_bool().ok_or_else(|| self.wrong(k, v, "a boolean")),
        }
    }

    /// A string, or `None` when absent or null.
    pub fn opt_str(&self, names: &[&'a str]) -> KeyResult<Option<&'a str>> {
        match self.field(names)? {
            Field::Absent | Field::Null(_) => Ok(None),
            Field::Value(k, v) => v.as_str().map(Some).ok_or_else(|| self.wrong(k, v, "a string")),
        }
    }

    /// A list of non-negative integers (`mlp_only_layers`), `None` when absent or null.
    pub fn usize_list(&self, names: &[&'a str]) -> KeyResult<Option<Vec<usize>>> {
        match self.field(names)? {
            Field::Absent | Field::Null(_) => Ok(None),
            Field::Value(k, v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok())).collect())
                .map(Some)
                .ok_or_else(|| self.wrong(k, v, "a list of non-negative integers")),
        }
    }

    /// Errors unless the string key (when present) is one of `allowed`: the library implements
    /// only those. `what` says what the allowed values mean.
    pub fn only(&self, names: &[&'a str], allowed: &[&str], what: &str) -> KeyResult<()> {
        match self.opt_str(names)? {
            Some(v) if !allowed.contains(&v) => Err(format!(
                "{}{} = {v:?} is not supported: this family's code implements {what} ({allowed:?})",
                self.path, names[0]
            )),
            _ => Ok(()),
        }
    }

    fn missing(&self, names: &[&str]) -> String {
        let spelled: Vec<String> = names.iter().map(|n| format!("{}{n}", self.path)).collect();
        format!("none of {} is set", spelled.join(" / "))
    }
}

/// `hidden_act` (or another activation key) must be SiLU, the only gated activation the
/// families' experts use besides gpt-oss's own.
pub(crate) fn require_silu(k: &Keys<'_>, names: &[&str]) -> KeyResult<()> {
    k.only(names, &["silu", "swish"], "SwiGLU experts")
}

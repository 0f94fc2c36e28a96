//! Finds a key written twice in one YAML mapping. serde_yaml (under figment) keeps the last of two
//! equal keys without a word, so a job file with `workers:` twice would silently run the second.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A key that appears twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Dotted path of the key (`workers.min`, `overrides.optimizer.lr`, `data.shards[0].x`).
    pub key: String,
    /// 1-based line of its second occurrence, when the parser reports one.
    pub line: Option<usize>,
}

/// The first key written twice in the same mapping of `text`, at any nesting level; `None` when every
/// mapping's keys are distinct or `text` is not valid YAML (the caller's parser reports that).
pub fn find_duplicate_key(text: &str) -> Option<DuplicateKey> {
    let found = RefCell::new(None);
    let walker = Walker {
        path: String::new(),
        found: &found,
    };
    match walker.deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(()) => None,
        Err(e) => found.into_inner().map(|key| DuplicateKey {
            key,
            line: e.location().map(|l| l.line()),
        }),
    }
}

/// Visits a value, checking every mapping in it; `found` receives the path of a duplicate.
struct Walker<'a> {
    path: String,
    found: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Walker<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walker<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq
            .next_element_seed(Walker {
                path: format!("{}[{i}]", self.path),
                found: self.found,
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = BTreeSet::new();
        loop {
            let key = KeySeed {
                prefix: &self.path,
                seen: &mut seen,
                found: self.found,
            };
            // The key's own deserializer reports the duplicate, so the error carries its line.
            let Some(key) = map.next_key_seed(key)? else {
                return Ok(());
            };
            map.next_value_seed(Walker {
                path: key,
                found: self.found,
            })?;
        }
    }
}

/// Reads one mapping key; fails on a key already `seen` in this mapping.
struct KeySeed<'a, 'b> {
    prefix: &'a str,
    seen: &'a mut BTreeSet<String>,
    found: &'b RefCell<Option<String>>,
}

impl KeySeed<'_, '_> {
    fn record<E: serde::de::Error>(self, key: String) -> Result<String, E> {
        let path = if self.prefix.is_empty() {
            key.clone()
        } else {
            format!("{}.{key}", self.prefix)
        };
        if self.seen.insert(key) {
            Ok(path)
        } else {
            let message = format!("duplicate key {path}");
            *self.found.borrow_mut() = Some(path);
            Err(E::custom(message))
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        self.record(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        self.record(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        self.record(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        self.record(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        self.record(v.to_string())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<String, E> {
        self.record("null".into())
    }
    // A list or mapping used as a key (rare YAML) is not compared: it is read past and never a
    // duplicate.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(format!("{}[complex key]", self.prefix))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(format!("{}[complex key]", self.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct keys (also equal keys in different mappings) are no duplicate; invalid YAML is left to
    /// the real parser.
    #[test]
    fn distinct_keys_pass() {
        let text = "name: a\nworkers: {min: 1}\nhang: {min: 2}\nlist: [{a: 1}, {a: 2}]\n";
        assert_eq!(find_duplicate_key(text), None);
        assert_eq!(find_duplicate_key("a: [1, 2\n"), None);
        assert_eq!(find_duplicate_key(""), None);
    }

    /// Duplicates are found at the top, nested in block and flow mappings and inside lists, with the
    /// line of the second occurrence.
    #[test]
    fn duplicates_are_found_with_their_line() {
        let cases = [
            ("name: a\nsteps: 1\nname: b\n", "name", 3),
            (
                "name: a\nworkers:\n  min: 1\n  max: 2\n  min: 3\n",
                "workers.min",
                5,
            ),
            (
                "overrides:\n  optimizer: {lr: 1e-4, lr: .nan}\n",
                "overrides.optimizer.lr",
                2,
            ),
            (
                "data:\n  shards:\n    - {a: 1, a: 2}\n",
                "data.shards[0].a",
                3,
            ),
            ("1: x\n1: y\n", "1", 2),
        ];
        for (text, key, line) in cases {
            assert_eq!(
                find_duplicate_key(text),
                Some(DuplicateKey {
                    key: key.into(),
                    line: Some(line)
                }),
                "{text}"
            );
        }
    }
}

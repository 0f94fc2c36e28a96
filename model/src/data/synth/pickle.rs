//! A minimal pickle (protocol 2) writer for JSON-like values, enough for the REFER toolkit's
//! `refs(unc).p` (a list of dicts of strings, integers and lists).
//!
//! The opcodes are the ones CPython's C pickler (`pickle.dump(obj, f, 2)`) emits for these types, minus
//! the memo (`BINPUT` / `BINGET`): the output equals what a pickler in `fast` mode writes, so it is
//! readable by any Python 3 and by [`crate::checkpoint::torch_pickle::read_plain_pickle`].

use serde_json::{Map, Number, Value};

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const BINUNICODE8: u8 = 0x8d;
const EMPTY_LIST: u8 = b']';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';

/// CPython's `BATCHSIZE`: items per `APPENDS` / `SETITEMS`, so long containers are split as Python
/// splits them (and a reader's stack stays short).
const BATCH: usize = 1000;

/// The protocol-2 pickle of `value`: lists become Python lists, objects dicts with `str` keys,
/// integers `int`, other numbers `float`, strings `str`, booleans `bool`, null `None`.
pub fn to_pickle(value: &Value) -> Vec<u8> {
    let mut out = vec![PROTO, 2];
    save(value, &mut out);
    out.push(STOP);
    out
}

fn save(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(NONE),
        Value::Bool(b) => out.push(if *b { NEWTRUE } else { NEWFALSE }),
        Value::Number(n) => save_number(n, out),
        Value::String(s) => save_str(s, out),
        Value::Array(items) => save_list(items, out),
        Value::Object(map) => save_dict(map, out),
    }
}

fn save_number(n: &Number, out: &mut Vec<u8>) {
    if let Some(i) = n.as_i64() {
        save_int(i128::from(i), out);
    } else if let Some(u) = n.as_u64() {
        save_int(i128::from(u), out);
    } else {
        // serde_json numbers that are not integers are finite f64.
        out.push(BINFLOAT);
        out.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_be_bytes());
    }
}

/// The smallest opcode Python uses: unsigned 1 or 2 bytes, signed 4 bytes, else `LONG1` with the
/// minimal little-endian two's complement (u64 and i64 need at most 9 bytes).
fn save_int(v: i128, out: &mut Vec<u8>) {
    if (0..=0xff).contains(&v) {
        out.extend_from_slice(&[BININT1, v as u8]);
    } else if (0..=0xffff).contains(&v) {
        out.push(BININT2);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if (i128::from(i32::MIN)..=i128::from(i32::MAX)).contains(&v) {
        out.push(BININT);
        out.extend_from_slice(&(v as i32).to_le_bytes());
    } else {
        let bytes = v.to_le_bytes();
        let mut n = bytes.len();
        // Drop a top byte that only repeats the sign of the byte below it.
        while n > 1 {
            let (top, below) = (bytes[n - 1], bytes[n - 2]);
            let redundant =
                (top == 0x00 && below & 0x80 == 0) || (top == 0xff && below & 0x80 != 0);
            if !redundant {
                break;
            }
            n -= 1;
        }
        out.extend_from_slice(&[LONG1, n as u8]);
        out.extend_from_slice(&bytes[..n]);
    }
}

fn save_str(s: &str, out: &mut Vec<u8>) {
    match u32::try_from(s.len()) {
        Ok(len) => {
            out.push(BINUNICODE);
            out.extend_from_slice(&len.to_le_bytes());
        }
        // Over 4 GiB protocol 2 has no opcode; Python 3 reads the protocol-4 one whatever the header says.
        Err(_) => {
            out.push(BINUNICODE8);
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

fn save_list(items: &[Value], out: &mut Vec<u8>) {
    out.push(EMPTY_LIST);
    if let [only] = items {
        // The C pickler appends a lone item without a mark.
        save(only, out);
        out.push(APPEND);
        return;
    }
    for chunk in items.chunks(BATCH) {
        out.push(MARK);
        for v in chunk {
            save(v, out);
        }
        out.push(APPENDS);
    }
}

fn save_dict(map: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(EMPTY_DICT);
    let entries: Vec<(&String, &Value)> = map.iter().collect();
    if let [(k, v)] = entries.as_slice() {
        save_str(k, out);
        save(v, out);
        out.push(SETITEM);
        return;
    }
    for chunk in entries.chunks(BATCH) {
        out.push(MARK);
        for (k, v) in chunk {
            save_str(k, out);
            save(v, out);
        }
        out.push(SETITEMS);
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::json;

    use super::*;
    use crate::checkpoint::torch_pickle::read_plain_pickle;

    /// Every type and integer width, empty and one-item containers, a list longer than one batch.
    fn sample() -> Value {
        let ints: Vec<i64> = vec![
            0,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -256,
            i64::from(i32::MAX),
            i64::from(i32::MAX) + 1,
            i64::from(i32::MIN),
            i64::from(i32::MIN) - 1,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ];
        json!({
            "ints": ints,
            "big": u64::MAX,
            "floats": [0.0, 0.5, -2.25, 1e300, -1e-300, 3.0],
            "strings": ["", "the red circle", "é ✓ 字"],
            "flags": [true, false, null],
            "empty_list": [],
            "empty_dict": {},
            "one": [7],
            "single": {"k": "v"},
            "long": (0..2501).collect::<Vec<i64>>(),
            "refs": [{"ref_id": 40, "sentences": [{"sent_id": 0, "tokens": ["the", "dog"]}]}],
        })
    }

    /// Integers take Python's opcode for their size.
    #[test]
    fn integers_take_pythons_opcodes() {
        let op = |v: i64| to_pickle(&json!(v))[2..].to_vec();
        assert_eq!(op(5), [BININT1, 5, STOP]);
        assert_eq!(op(256), [BININT2, 0, 1, STOP]);
        assert_eq!(op(-1), [BININT, 0xff, 0xff, 0xff, 0xff, STOP]);
        assert_eq!(op(1 << 31), [LONG1, 5, 0, 0, 0, 0x80, 0, STOP]);
        assert_eq!(op(i64::MIN)[..2], [LONG1, 8]);
    }

    /// The crate's own reader gets the value back (but for `u64::MAX`: it reads at most 8-byte
    /// `LONG1`s, which is every i64, and gives null past that).
    #[test]
    fn round_trips_through_read_plain_pickle() {
        let mut v = sample();
        let big = v.as_object_mut().and_then(|m| m.remove("big"));
        assert_eq!(big, Some(json!(u64::MAX)));
        let back = read_plain_pickle(&to_pickle(&v)).expect("readable");
        assert!(back == v, "read back {back}");
    }

    /// Python's `pickle.load` reads the same value, and a memo-less (`fast`) C pickler writes the same
    /// bytes; skipped (with a note) where python3 is not on PATH.
    #[test]
    fn python_reads_it_and_writes_the_same_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (pkl, js) = (dir.path().join("v.p"), dir.path().join("v.json"));
        let v = sample();
        std::fs::write(&pkl, to_pickle(&v)).expect("write pickle");
        std::fs::write(&js, v.to_string()).expect("write json");
        let load = "import pickle,sys,json; print(json.dumps(pickle.load(open(sys.argv[1],'rb'))))";
        let Some(loaded) = python(load, &pkl) else {
            eprintln!("skipped: python3 is not on PATH (or failed to start)");
            return;
        };
        let back: Value = serde_json::from_slice(&loaded).expect("python printed json");
        assert!(back == v, "python read {back}");
        let dump =
            "import pickle,sys,json,io; b=io.BytesIO(); p=pickle.Pickler(b,2); p.fast=True; \
                    p.dump(json.load(open(sys.argv[1]))); sys.stdout.buffer.write(b.getvalue())";
        let dumped = python(dump, &js).expect("python ran once");
        assert!(
            dumped == to_pickle(&v),
            "bytes differ from Python's pickler"
        );
    }

    /// stdout of `python3 -c code path`; None when python3 cannot be started. A Python failure panics.
    fn python(code: &str, path: &std::path::Path) -> Option<Vec<u8>> {
        let out = Command::new("python3")
            .arg("-c")
            .arg(code)
            .arg(path)
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(out.stdout)
    }
}

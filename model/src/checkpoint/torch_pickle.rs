//! Official `torch.save` files (zip + pickle, PyTorch ≥ 1.6): a small pickle machine that understands
//! what state dicts and training checkpoints contain (dicts, `OrderedDict`, lists, tuples, scalars,
//! strings, `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, typed storages). Other Python
//! objects (e.g. `argparse.Namespace`) become opaque and are skipped. Nested containers are flattened
//! to dotted names (`model.vision_encoder.norm.weight`, `config.image_res`).
//!
//! libtorch's own `pickle_load` cannot be used: it turns every `collections.OrderedDict` into None, and
//! `state_dict()` is an OrderedDict. Tensors that share a storage in the file (tied weights) share it
//! here too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Kind, Tensor};

use super::torch_zip::ZipRecords;
use super::{CheckpointError, StateDict};

/// Everything in a `torch.save` file, flattened: `model.vision_encoder.norm.weight`, `config.image_res`.
#[derive(Debug, Default)]
pub struct TorchFile {
    /// Tensors by dotted path, in file order.
    pub tensors: Vec<(String, Tensor)>,
    /// Non-tensor leaves (ints, floats, bools, strings, None) as JSON, by dotted path.
    pub scalars: Vec<(String, serde_json::Value)>,
}

impl TorchFile {
    /// The state dict as the official loaders take it: `checkpoint['model']` if present, else everything.
    pub fn state_dict(self) -> StateDict {
        let has_model = self.tensors.iter().any(|(k, _)| k.starts_with("model."));
        self.tensors
            .into_iter()
            .filter_map(|(k, t)| {
                if !has_model {
                    Some((k, t))
                } else {
                    k.strip_prefix("model.").map(|s| (s.to_string(), t))
                }
            })
            .collect()
    }

    /// The saved `config` dict's leaves (`config.*` with the prefix removed).
    pub fn config(&self) -> Vec<(String, serde_json::Value)> {
        self.scalars
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("config.")
                    .map(|s| (s.to_string(), v.clone()))
            })
            .collect()
    }
}

#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(String, String),
    Storage(Rc<Tensor>),
    Tensor(Rc<Tensor>),
    Opaque,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    bytes: &'a [u8],
    zip: &'a ZipRecords,
    prefix: String,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    storages: HashMap<String, Rc<Tensor>>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or("pickle data ends early")?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated GLOBAL")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("MARK missing")?;
        if m > self.stack.len() {
            return Err("MARK beyond the stack".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn storage(&mut self, pid: &Value) -> Result<Value, String> {
        let Value::Tuple(t) = pid else {
            return Ok(Value::Opaque);
        };
        let (Some(Value::Str(tag)), Some(Value::Global(_, ty)), Some(Value::Str(key))) =
            (t.first(), t.get(1), t.get(2))
        else {
            return Err("unrecognised persistent id".into());
        };
        if tag != "storage" {
            return Err(format!("unsupported persistent id tag {tag:?}"));
        }
        if let Some(s) = self.storages.get(key) {
            return Ok(Value::Storage(s.clone()));
        }
        let kind = storage_kind(ty).ok_or_else(|| format!("unsupported storage type {ty}"))?;
        let name = format!("{}data/{key}", self.prefix);
        let range = self
            .zip
            .get(&name)
            .ok_or_else(|| format!("storage record {name} missing"))?;
        let raw = &self.bytes[range];
        let elt = kind.elt_size_in_bytes();
        let numel = raw.len() / elt;
        let tensor = Tensor::f_from_data_size(&raw[..numel * elt], &[numel as i64], kind)
            .map_err(|e| format!("storage {key}: {e}"))?;
        let rc = Rc::new(tensor);
        self.storages.insert(key.clone(), rc.clone());
        Ok(Value::Storage(rc))
    }

    fn ints(v: Option<&Value>) -> Result<Vec<i64>, String> {
        match v {
            Some(Value::Tuple(t)) => t
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Ok(*i),
                    _ => Err("non-integer size/stride".to_string()),
                })
                .collect(),
            _ => Err("size/stride is not a tuple".into()),
        }
    }

    fn reduce(&mut self, f: Value, args: Value) -> Result<Value, String> {
        let Value::Global(module, name) = f else {
            return Ok(Value::Opaque);
        };
        let args = match args {
            Value::Tuple(t) => t,
            _ => Rc::new(Vec::new()),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => {
                let mut items = Vec::new();
                if let Some(Value::List(l)) = args.first() {
                    for pair in l.borrow().iter() {
                        if let Value::Tuple(kv) = pair {
                            if let (Some(k), Some(v)) = (kv.first(), kv.get(1)) {
                                items.push((k.clone(), v.clone()));
                            }
                        }
                    }
                }
                Value::Dict(Rc::new(RefCell::new(items)))
            }
            ("torch._utils", "_rebuild_tensor_v2") => {
                let Some(Value::Storage(storage)) = args.first() else {
                    return Err("_rebuild_tensor_v2 without a storage".into());
                };
                let offset = match args.get(1) {
                    Some(Value::Int(i)) => *i,
                    _ => return Err("_rebuild_tensor_v2: bad storage offset".into()),
                };
                let size = Self::ints(args.get(2))?;
                let stride = Self::ints(args.get(3))?;
                let t = storage
                    .f_as_strided(size.as_slice(), stride.as_slice(), offset)
                    .map_err(|e| format!("_rebuild_tensor_v2: {e}"))?;
                Value::Tensor(Rc::new(t))
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => {
                args.first().cloned().unwrap_or(Value::None)
            }
            _ => Value::Opaque,
        })
    }

    fn run(&mut self) -> Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.u64()?;
                } // FRAME
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                0x8f => self.stack.push(Value::Opaque), // EMPTY_SET
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self.memo.get(&i).cloned().ok_or("memo key missing")?;
                    self.stack.push(v);
                }
                // Python 2 `str` (SHORT_BINSTRING, BINSTRING), as in the REFER toolkit's pickles.
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                // Protocol 0 text opcodes: INT / LONG, FLOAT, STRING, UNICODE, PUT, GET.
                b'I' | b'L' => {
                    let text = self.line()?;
                    let t = text.trim_end_matches('L');
                    self.stack.push(match t {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(t.parse().map_err(|_| format!("bad INT {text:?}"))?),
                    });
                }
                b'F' => {
                    let text = self.line()?;
                    let v = text.parse().map_err(|_| format!("bad FLOAT {text:?}"))?;
                    self.stack.push(Value::Float(v));
                }
                b'S' => {
                    let text = self.line()?;
                    let inner = text.trim().trim_matches(|c| c == '\'' || c == '"');
                    self.stack.push(Value::Str(inner.to_string()));
                }
                b'V' => {
                    let text = self.line()?;
                    self.stack.push(Value::Str(text));
                }
                b'p' => {
                    let text = self.line()?;
                    let i = text.parse().map_err(|_| format!("bad PUT {text:?}"))?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'g' => {
                    let text = self.line()?;
                    let i: u32 = text.parse().map_err(|_| format!("bad GET {text:?}"))?;
                    let v = self.memo.get(&i).cloned().ok_or("memo key missing")?;
                    self.stack.push(v);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        self.stack.push(Value::Opaque);
                    } else {
                        let mut v: i64 = 0;
                        for (i, byte) in b.iter().enumerate() {
                            v |= (*byte as i64) << (8 * i);
                        }
                        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                            v -= 1i64 << (8 * n);
                        }
                        self.stack.push(Value::Int(v));
                    }
                }
                b'G' => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(self.take(8)?);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'N' => self.stack.push(Value::None),
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ cls args
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Value::Opaque);
                }
                b'b' => {
                    // BUILD: the state (e.g. a state dict's `_metadata`) is not needed.
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.storage(&pid)?;
                    self.stack.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Value::Dict(d) = self.top()? {
                        d.borrow_mut().push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Value::Dict(d) = self.top()? {
                        let mut d = d.borrow_mut();
                        for kv in items.chunks(2) {
                            if let [k, v] = kv {
                                d.push((k.clone(), v.clone()));
                            }
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Value::List(l) = self.top()? {
                        l.borrow_mut().push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Value::List(l) = self.top()? {
                        l.borrow_mut().extend(items);
                    }
                }
                0x90 => {
                    self.pop_mark()?;
                } // ADDITEMS to a set
                0x91 => {
                    self.pop_mark()?;
                    self.stack.push(Value::Opaque);
                } // FROZENSET
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

fn key_string(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn flatten(v: &Value, path: &str, out: &mut TorchFile) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Tensor(t) => out.tensors.push((path.to_string(), t.shallow_clone())),
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                if let Some(k) = key_string(k) {
                    flatten(v, &join(&k), out);
                }
            }
        }
        Value::List(l) => {
            for (i, v) in l.borrow().iter().enumerate() {
                flatten(v, &join(&i.to_string()), out);
            }
        }
        Value::Tuple(t) => {
            for (i, v) in t.iter().enumerate() {
                flatten(v, &join(&i.to_string()), out);
            }
        }
        Value::None => out
            .scalars
            .push((path.to_string(), serde_json::Value::Null)),
        Value::Bool(b) => out.scalars.push((path.to_string(), (*b).into())),
        Value::Int(i) => out.scalars.push((path.to_string(), (*i).into())),
        Value::Float(f) => out.scalars.push((
            path.to_string(),
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
        )),
        Value::Str(s) => out.scalars.push((path.to_string(), s.clone().into())),
        Value::Bytes | Value::Global(..) | Value::Storage(_) | Value::Opaque => {}
    }
}

fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.clone()),
        Value::Tuple(t) => J::Array(t.iter().map(to_json).collect()),
        Value::List(l) => J::Array(l.borrow().iter().map(to_json).collect()),
        Value::Dict(d) => J::Object(
            d.borrow()
                .iter()
                .filter_map(|(k, v)| key_string(k).map(|k| (k, to_json(v))))
                .collect(),
        ),
        Value::Bytes | Value::Global(..) | Value::Storage(_) | Value::Tensor(_) | Value::Opaque => {
            J::Null
        }
    }
}

/// Reads a plain (non-`torch.save`) pickle of Python containers and scalars, such as the REFER
/// toolkit's `refs(unc).p`, as JSON (dict keys become strings; other objects become null).
pub fn read_plain_pickle(data: &[u8]) -> Result<serde_json::Value, String> {
    let zip = ZipRecords::default();
    let mut machine = Machine {
        data,
        pos: 0,
        bytes: data,
        zip: &zip,
        prefix: String::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
    };
    machine.run().map(|root| to_json(&root))
}

fn format_err(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a zip-format `torch.save` file (PyTorch ≥ 1.6 default) into flattened tensors and scalars.
pub fn read_torch_file(path: &Path) -> Result<TorchFile, CheckpointError> {
    let open_err = |source| CheckpointError::Open {
        path: PathBuf::from(path),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(open_err)?;
    if !bytes.starts_with(b"PK\x03\x04") {
        let reason = if bytes.first() == Some(&0x80) {
            "legacy (pre-1.6, non-zip) torch.save format; re-save it with \
             torch.save(obj, path, _use_new_zipfile_serialization=True)"
        } else {
            "not a zip-format torch.save file"
        };
        return Err(format_err(path, reason));
    }
    let zip = ZipRecords::parse(&bytes).map_err(|e| format_err(path, e))?;
    let (pkl_name, pkl) = zip.find("data.pkl").ok_or_else(|| {
        format_err(
            path,
            "zip has no data.pkl record (not a torch.save archive)",
        )
    })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(r) = zip.get(&format!("{prefix}byteorder")) {
        if &bytes[r] != b"little" {
            return Err(format_err(path, "big-endian checkpoints are not supported"));
        }
    }
    let mut machine = Machine {
        data: &bytes[pkl],
        pos: 0,
        bytes: &bytes,
        zip: &zip,
        prefix,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
    };
    let root = machine
        .run()
        .map_err(|e| format_err(path, format!("pickle: {e}")))?;
    let mut file = TorchFile::default();
    flatten(&root, "", &mut file);
    Ok(file)
}

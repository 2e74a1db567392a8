//! Pickle: an allow-listed subset of protocols 2-5, enough for torch state dicts.

use std::collections::HashMap;
use std::rc::Rc;

use super::Msg;
use crate::loader::DType;

/// Bounds that keep the work and memory of a run linear in the pickle's length: memoised
/// values are shared, never copied, so one of these is the most a few bytes of opcodes
/// (`BINGET` + `REDUCE`) can make. Torch's own calls take at most 7 arguments; RWKV tensors
/// have at most 3 dimensions; the largest model state dict has a few thousand tensors.
const MAX_CALL_ARGS: usize = 8;
const MAX_RANK: usize = 16;
const MAX_TENSORS: usize = 1 << 18;

/// Globals a state dict may name. Nothing is ever called: each is interpreted here.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildFromTypeV2,
    Storage(DType),
    /// `torch.Tensor` / `torch.nn.Parameter`: only appear as the ignored type argument of
    /// `_rebuild_from_type_v2`.
    TensorType,
}

fn global(module: &str, name: &str) -> Msg<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "HalfStorage") => Global::Storage(DType::F16),
        ("torch", "BFloat16Storage") => Global::Storage(DType::BF16),
        ("torch", "FloatStorage") => Global::Storage(DType::F32),
        ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => Global::TensorType,
        ("torch", s) if s.ends_with("Storage") => {
            return Err(format!(
                "storage type `torch.{s}` is not supported: only f16, bf16 and f32 tensors are"
            ))
        }
        _ => {
            return Err(format!(
                "refusing pickle global `{module}.{name}`: a state dict of tensors never needs it"
            ))
        }
    })
}

/// Containers live in arenas and values refer to them by index, which gives Python's
/// sharing semantics for memoised objects, O(1) copies, and no recursive drops.
#[derive(Clone, Debug)]
enum Value {
    Int(i64),
    Str(Rc<str>),
    /// Parsed but never needed: None, bools, floats, bytes, integers wider than 64 bits.
    Opaque,
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Global),
    Storage(usize),
    Tensor(usize),
}

pub(super) struct StorageRef {
    pub(super) dtype: DType,
    pub(super) key: Rc<str>,
    pub(super) numel: usize,
}

pub(super) struct TensorRef {
    pub(super) storage: usize,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

#[derive(Default)]
pub(super) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    seqs: Vec<Vec<Value>>, // tuples and lists
    dicts: Vec<Vec<(Value, Value)>>,
    pub(super) storages: Vec<StorageRef>,
    pub(super) tensors: Vec<TensorRef>,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Unpickler { data, ..Default::default() }
    }

    /// Runs the pickle and lists the state dict's tensors: (name, index into `tensors`),
    /// each name once.
    pub(super) fn state_dict_tensors(&mut self) -> Msg<Vec<(Rc<str>, usize)>> {
        let root = self.run()?;
        self.state_dict(&root)
    }

    fn run(&mut self) -> Msg<Value> {
        loop {
            let at = self.pos;
            match self.step() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => return Err(format!("data.pkl, byte {at}: {e}")),
            }
        }
    }

    /// Executes one opcode; returns the result at STOP.
    fn step(&mut self) -> Msg<Option<Value>> {
        let op = self.take(1)?[0];
        let v = match op {
            0x80 => return self.take(1).map(|_| None), // PROTO: any of 2-5 is fine
            0x95 => return self.take(8).map(|_| None), // FRAME: only a read-ahead hint
            b'.' => return self.pop().map(Some),       // STOP
            b'(' => {
                // MARK
                self.marks.push(self.stack.len());
                return Ok(None);
            }
            b'}' => self.new_dict(Vec::new()),       // EMPTY_DICT
            b']' => self.new_seq(Vec::new(), false), // EMPTY_LIST
            b')' => self.new_seq(Vec::new(), true),  // EMPTY_TUPLE
            b't' => {
                // TUPLE
                let items = self.pop_mark()?;
                self.new_seq(items, true)
            }
            0x85..=0x87 => {
                // TUPLE1, TUPLE2, TUPLE3
                let n = usize::from(op - 0x84);
                let at = self.stack.len().checked_sub(n).ok_or("stack underflow")?;
                let items = self.stack.split_off(at);
                self.new_seq(items, true)
            }
            b'l' => {
                // LIST
                let items = self.pop_mark()?;
                self.new_seq(items, false)
            }
            b'd' => {
                // DICT
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.new_dict(pairs)
            }
            b'a' | b'e' => {
                // APPEND, APPENDS
                let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                match self.stack.last() {
                    Some(Value::List(i)) => self.seqs[*i].extend(items),
                    _ => return Err("APPEND to something that is not a list".into()),
                }
                return Ok(None);
            }
            b's' | b'u' => {
                // SETITEM, SETITEMS
                let items = if op == b's' {
                    let v = self.pop()?;
                    vec![self.pop()?, v]
                } else {
                    self.pop_mark()?
                };
                let pairs = pairs(items)?;
                match self.stack.last() {
                    Some(Value::Dict(i)) => self.dicts[*i].extend(pairs),
                    _ => return Err("SETITEM on something that is not a dict".into()),
                }
                return Ok(None);
            }
            b'q' | b'r' | 0x94 => {
                // BINPUT, LONG_BINPUT, MEMOIZE
                let key = match op {
                    b'q' => self.uint(1)?,
                    b'r' => self.uint(4)?,
                    _ => self.memo.len() as u64,
                };
                let top = self.stack.last().ok_or("memoising from an empty stack")?.clone();
                self.memo.insert(key, top);
                return Ok(None);
            }
            b'h' | b'j' => {
                // BINGET, LONG_BINGET
                let key = self.uint(if op == b'h' { 1 } else { 4 })?;
                self.memo.get(&key).cloned().ok_or_else(|| format!("memo entry {key} missing"))?
            }
            b'K' => Value::Int(self.uint(1)? as i64), // BININT1
            b'M' => Value::Int(self.uint(2)? as i64), // BININT2
            b'J' => Value::Int(self.uint(4)? as u32 as i32 as i64), // BININT
            0x8a => {
                // LONG1
                let n = self.uint(1)? as usize;
                let bytes = self.take(n)?;
                match bytes.len() {
                    0 => Value::Int(0),
                    1..=8 => {
                        // Two's complement, little-endian: sign-extend from the top byte.
                        let fill = if bytes[n - 1] & 0x80 != 0 { 0xFF } else { 0 };
                        let mut buf = [fill; 8];
                        buf[..n].copy_from_slice(bytes);
                        Value::Int(i64::from_le_bytes(buf))
                    }
                    _ => Value::Opaque,
                }
            }
            b'N' | 0x88 | 0x89 => Value::Opaque, // None, True, False
            b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, BINSTRING, SHORT_BINSTRING
                let n = match op {
                    0x8c | b'U' => self.uint(1)?,
                    0x8d => self.uint(8)?,
                    _ => self.uint(4)?,
                };
                let bytes = self.take(usize::try_from(n).map_err(|_| "string length overflows")?)?;
                // BINSTRING/SHORT_BINSTRING are Python 2 `str`: decode leniently.
                Value::Str(String::from_utf8_lossy(bytes).into())
            }
            b'B' | b'C' => {
                // BINBYTES, SHORT_BINBYTES
                let n = self.uint(if op == b'C' { 1 } else { 4 })? as usize;
                self.take(n)?;
                Value::Opaque
            }
            b'G' => self.take(8).map(|_| Value::Opaque)?, // BINFLOAT
            b'c' => {
                // GLOBAL
                let module = self.line()?;
                let name = self.line()?;
                Value::Global(global(&module, &name)?)
            }
            0x93 => {
                // STACK_GLOBAL
                let (name, module) = (self.pop()?, self.pop()?);
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => Value::Global(global(&m, &n)?),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                // REDUCE
                let args = self.pop()?;
                let func = self.pop()?;
                self.call(&func, &args)?
            }
            b'b' => {
                // BUILD: the state of an OrderedDict (`_metadata`) or tensor is of no use to us.
                self.pop()?;
                return match self.stack.last() {
                    Some(Value::Dict(_) | Value::Tensor(_)) => Ok(None),
                    _ => Err("BUILD on an object other than a dict or tensor".into()),
                };
            }
            b'Q' => {
                // BINPERSID
                let pid = self.pop()?;
                self.persistent_load(&pid)?
            }
            _ => return Err(format!("unsupported pickle opcode 0x{op:02x}")),
        };
        self.stack.push(v);
        Ok(None)
    }

    fn take(&mut self, n: usize) -> Msg<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let out =
            self.pos.checked_add(n).and_then(|end| data.get(self.pos..end)).ok_or("truncated pickle")?;
        self.pos += n;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Msg<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
    }

    fn line(&mut self) -> Msg<String> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let len = rest.iter().position(|&c| c == b'\n').ok_or("truncated pickle")?;
        let text =
            std::str::from_utf8(self.take(len + 1)?[..len].as_ref()).map_err(|_| "non-UTF-8 global name")?;
        Ok(text.to_string())
    }

    fn pop(&mut self) -> Msg<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Msg<Vec<Value>> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        if mark > self.stack.len() {
            return Err("stack underflow below MARK".into());
        }
        Ok(self.stack.split_off(mark))
    }

    fn new_seq(&mut self, items: Vec<Value>, tuple: bool) -> Value {
        self.seqs.push(items);
        let i = self.seqs.len() - 1;
        if tuple {
            Value::Tuple(i)
        } else {
            Value::List(i)
        }
    }

    fn new_dict(&mut self, pairs: Vec<(Value, Value)>) -> Value {
        self.dicts.push(pairs);
        Value::Dict(self.dicts.len() - 1)
    }

    fn tuple(&self, v: &Value) -> Msg<&[Value]> {
        match v {
            Value::Tuple(i) => Ok(&self.seqs[*i]),
            _ => Err(format!("expected a tuple, found {v:?}")),
        }
    }

    fn call(&mut self, func: &Value, args: &Value) -> Msg<Value> {
        let n = self.tuple(args)?.len();
        if n > MAX_CALL_ARGS {
            return Err(format!("cannot call {func:?} with {n} arguments"));
        }
        let args = self.tuple(args)?.to_vec();
        match func {
            Value::Global(Global::OrderedDict) if args.is_empty() => Ok(self.new_dict(Vec::new())),
            Value::Global(Global::RebuildTensorV2) => self.rebuild_tensor(&args),
            Value::Global(Global::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err("_rebuild_parameter without a tensor".into()),
            },
            // (func, type, args, state): rebuild with `func`, drop the Python subclass.
            Value::Global(Global::RebuildFromTypeV2) => match args.as_slice() {
                [f @ Value::Global(Global::RebuildTensorV2 | Global::RebuildParameter), _, inner, ..] => {
                    self.call(f, inner)
                }
                _ => Err("unsupported _rebuild_from_type_v2 arguments".into()),
            },
            _ => Err(format!("cannot call {func:?} with {} arguments", args.len())),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`
    fn rebuild_tensor(&mut self, args: &[Value]) -> Msg<Value> {
        let [Value::Storage(storage), offset, shape, stride, ..] = args else {
            return Err("malformed _rebuild_tensor_v2 arguments".into());
        };
        let (shape, stride) = (self.tuple(shape)?, self.tuple(stride)?);
        if shape.len().max(stride.len()) > MAX_RANK {
            return Err(format!(
                "a tensor of {} dimensions: at most {MAX_RANK} are supported",
                shape.len().max(stride.len())
            ));
        }
        if self.tensors.len() == MAX_TENSORS {
            return Err(format!("more than {MAX_TENSORS} tensors: not a model's state dict"));
        }
        let t = TensorRef {
            storage: *storage,
            offset: non_negative(offset)?,
            shape: shape.iter().map(non_negative).collect::<Msg<_>>()?,
            stride: stride.iter().map(non_negative).collect::<Msg<_>>()?,
        };
        self.tensors.push(t);
        Ok(Value::Tensor(self.tensors.len() - 1))
    }

    /// Persistent ids name storages: ('storage', StorageType, key, location, numel).
    fn persistent_load(&mut self, pid: &Value) -> Msg<Value> {
        let (dtype, key, numel) = match self.tuple(pid)? {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, numel]
                if &**tag == "storage" =>
            {
                (*dtype, key.clone(), non_negative(numel)?)
            }
            other => return Err(format!("unsupported persistent id {other:?}")),
        };
        if self.storages.len() == MAX_TENSORS {
            return Err(format!("more than {MAX_TENSORS} storages: not a model's state dict"));
        }
        self.storages.push(StorageRef { dtype, key, numel });
        Ok(Value::Storage(self.storages.len() - 1))
    }

    /// The tensors of the state dict: the top-level dict if it holds any tensors, else
    /// its one nested dict that does (`{"state_dict": {...}, "epoch": 3}`).
    /// Non-tensor entries are skipped.
    fn state_dict(&self, root: &Value) -> Msg<Vec<(Rc<str>, usize)>> {
        let Value::Dict(top) = root else {
            return Err(format!("data.pkl holds {root:?}, not a dict of tensors"));
        };
        let direct = self.tensors_in(*top)?;
        if !direct.is_empty() {
            return Ok(direct);
        }
        let mut nested = Vec::new();
        for (_, v) in &self.dicts[*top] {
            if let Value::Dict(d) = v {
                let found = self.tensors_in(*d)?;
                if !found.is_empty() {
                    nested.push(found);
                }
            }
        }
        match nested.len() {
            1 => Ok(nested.remove(0)),
            0 if self.dicts[*top].iter().any(|(k, _)| matches!(k, Value::Str(k) if OPTIMIZER_KEYS.contains(&k.as_ref()))) => Err(
                "a training checkpoint: it holds optimizer state but no model weights; load the model .pth the training run exported (e.g. rwkv-final.pth)".into(),
            ),
            0 => Err("no tensors found at the top level or in a nested dict".into()),
            n => Err(format!("{n} nested dicts hold tensors: cannot tell which is the state dict")),
        }
    }

    /// A dict's tensors by name; a name set again keeps its place and takes the new
    /// tensor, as in Python.
    fn tensors_in(&self, dict: usize) -> Msg<Vec<(Rc<str>, usize)>> {
        let mut out: Vec<(Rc<str>, usize)> = Vec::new();
        let mut at: HashMap<Rc<str>, usize> = HashMap::new();
        for (k, v) in &self.dicts[dict] {
            match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => match at.get(k) {
                    Some(&i) => out[i].1 = *t,
                    None => {
                        at.insert(k.clone(), out.len());
                        out.push((k.clone(), *t));
                    }
                },
                (_, Value::Tensor(_)) => return Err(format!("tensor stored under non-string key {k:?}")),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Top-level keys by which trainers (PyTorch, Lightning, DeepSpeed) store optimizer state.
const OPTIMIZER_KEYS: [&str; 5] =
    ["optimizer", "optimizer_state_dict", "optimizer_states", "optim", "param_groups"];

fn non_negative(v: &Value) -> Msg<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("expected a non-negative size, found {i}")),
        _ => Err(format!("expected an integer, found {v:?}")),
    }
}

fn pairs(items: Vec<Value>) -> Msg<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
}

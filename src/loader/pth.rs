//! PyTorch `.pth` checkpoints: the zip layout `torch.save` has written since 1.6.
//!
//! The archive holds `<prefix>/data.pkl`, a pickle describing the state dict, and one
//! stored (uncompressed) entry `<prefix>/data/<key>` per storage. We memory-map the file,
//! read the zip directory ourselves, and interpret the pickle with a small allow-listed
//! unpickler: it never executes code, it only recognises the few globals a state dict of
//! f16/bf16/f32 tensors needs and rejects every other one by name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::loader::bytes::FileBytes;

use crate::error::{Error, Result};
use crate::loader::{Checkpoint, DType, TensorInfo};

/// The parsers report plain messages; `PthFile::open` attaches the path.
type Msg<T> = std::result::Result<T, String>;

pub struct PthFile {
    path: PathBuf,
    map: FileBytes,
    names: Vec<String>,
    tensors: HashMap<String, View>,
}

/// A tensor as a strided view into one storage; everything here was bounds-checked at open.
struct View {
    info: TensorInfo,
    /// The storage's bytes within the mapped file.
    storage: Range<usize>,
    /// Offset and strides in elements, as torch records them.
    offset: usize,
    stride: Vec<usize>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<PthFile> {
        Self::from_bytes(path, FileBytes::map(path)?)
    }

    /// `bytes` read as the file at `path` (the path names it in errors).
    pub fn from_bytes(path: &Path, map: FileBytes) -> Result<PthFile> {
        let (names, tensors) = parse(&map).map_err(|m| Error::load(path, m))?;
        Ok(PthFile { path: path.to_path_buf(), map, names, tensors })
    }
}

impl Checkpoint for PthFile {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|v| v.info.clone())
    }

    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let v = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("no tensor named `{name}`")))?;
        let bad = || Error::load(&self.path, format!("tensor `{name}` lies outside the file"));
        let storage = self.map.get(v.storage.clone()).ok_or_else(bad)?;
        let es = v.info.dtype.size();
        let numel = v.info.numel();
        if numel == 0 {
            return Ok(Cow::Borrowed(&[]));
        }
        if is_contiguous(&v.info.shape, &v.stride) {
            let start = v.offset * es; // cannot overflow: checked against the storage at open
            return storage.get(start..start + numel * es).map(Cow::Borrowed).ok_or_else(bad);
        }
        gather(storage, es, v.offset, &v.info.shape, &v.stride).map(Cow::Owned).ok_or_else(bad)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Row-major contiguity; dimensions of size 1 may carry any stride.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(d);
    }
    true
}

/// Copies a strided view into row-major order: whole rows when the last dimension is
/// unit-stride (a sliced tensor), one element at a time otherwise (a transposed one).
fn gather(src: &[u8], es: usize, offset: usize, shape: &[usize], stride: &[usize]) -> Option<Vec<u8>> {
    let (run, outer) = match (shape.last(), stride.last()) {
        (Some(&n), Some(&1)) => (n, shape.len() - 1),
        _ => (1, shape.len()),
    };
    let mut out = Vec::with_capacity(shape.iter().product::<usize>() * es);
    let mut idx = vec![0usize; outer];
    loop {
        let elem = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(src.get(elem * es..(elem + run) * es)?);
        // Advance the multi-index like an odometer; done when it wraps around.
        let mut d = outer;
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The whole open: zip directory, pickle, then each tensor checked against its storage.
fn parse(buf: &[u8]) -> Msg<(Vec<String>, HashMap<String, View>)> {
    let zip = Zip::parse(buf)?;
    let prefix = zip.prefix()?;
    if let Some(order) = zip.find(buf, &format!("{prefix}byteorder"))? {
        match std::str::from_utf8(&buf[order]).map(str::trim) {
            Ok("little") => {}
            Ok("big") => return Err("big-endian checkpoint: only little-endian is supported".into()),
            _ => return Err("unreadable `byteorder` entry".into()),
        }
    }
    let pkl = zip.find(buf, &format!("{prefix}data.pkl"))?.ok_or("no data.pkl")?;
    let mut up = Unpickler { data: &buf[pkl], ..Default::default() };
    let root = up.run()?;

    let mut names = Vec::new();
    let mut tensors = HashMap::new();
    for (name, t) in up.state_dict(&root)? {
        let t = &up.tensors[t];
        let st = &up.storages[t.storage];
        let what = |msg: String| format!("tensor `{name}`: {msg}");
        let entry_name = format!("{prefix}data/{}", st.key);
        let range = zip.find(buf, &entry_name).map_err(what)?;
        let range = range.ok_or_else(|| what(format!("no zip entry `{entry_name}`")))?;
        let es = st.dtype.size();
        if Some(range.len()) != st.numel.checked_mul(es) {
            return Err(what(format!(
                "storage `{}` has {} bytes, but its header says {} elements of {} bytes",
                st.key,
                range.len(),
                st.numel,
                es
            )));
        }
        check_view(t, st.numel).map_err(what)?;
        let info = TensorInfo { dtype: st.dtype, shape: t.shape.clone() };
        let view = View { info, storage: range, offset: t.offset, stride: t.stride.clone() };
        if tensors.insert(name.clone(), view).is_none() {
            names.push(name);
        }
    }
    Ok((names, tensors))
}

/// The view must fit inside its storage, with no arithmetic overflow on the way.
fn check_view(t: &TensorRef, storage_numel: usize) -> Msg<()> {
    if t.shape.len() != t.stride.len() {
        return Err(format!("shape {:?} and stride {:?} differ in rank", t.shape, t.stride));
    }
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("element count overflows")?;
    // Byte counts (at most 4 bytes an element) must not overflow either.
    if numel.checked_mul(4).is_none() {
        return Err("element count overflows".into());
    }
    if numel == 0 {
        return Ok(());
    }
    // A view with more elements than its storage repeats elements (a stride of 0, an
    // expand): never a weight, and a way for a small file to claim terabytes.
    if numel > storage_numel {
        return Err(format!(
            "view of shape {:?} (stride {:?}) has {numel} elements but its storage only {storage_numel}: overlapping views are not weights",
            t.shape, t.stride
        ));
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
    match last {
        Some(last) if last < storage_numel => Ok(()),
        _ => Err(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches past the end of its storage of {} elements",
            t.offset, t.shape, t.stride, storage_numel
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Zip: just enough of the format to find stored entries, zip64 included.

const EOCD: u32 = 0x0605_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EOCD: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;

/// Little-endian field of `N` bytes at `at`, or an error if it runs past the end.
fn le<const N: usize>(b: &[u8], at: u64) -> Msg<u64> {
    let bytes = usize::try_from(at)
        .ok()
        .and_then(|at| b.get(at..at.checked_add(N)?))
        .ok_or_else(|| format!("truncated or corrupt zip archive (field at byte {at} is past the end)"))?;
    Ok(bytes.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
}

struct Entry {
    method: u64,
    flags: u64,
    compressed: u64,
    size: u64,
    header: u64,
}

struct Zip {
    entries: HashMap<String, Entry>,
}

impl Zip {
    fn parse(b: &[u8]) -> Msg<Zip> {
        // The end-of-central-directory record is 22 bytes plus a comment of up to 64 KiB.
        let last = b.len().checked_sub(22).ok_or("file too short to be a zip archive")?;
        let eocd = (last.saturating_sub(0xFFFF)..=last)
            .rev()
            .find(|&i| {
                le::<4>(b, i as u64) == Ok(u64::from(EOCD))
                    && le::<2>(b, i as u64 + 20).is_ok_and(|c| i as u64 + 22 + c <= b.len() as u64)
            })
            .ok_or("not a zip archive (no end-of-central-directory record): truncated or not a .pth")?
            as u64;
        let (mut count, mut cd_offset) = (le::<2>(b, eocd + 10)?, le::<4>(b, eocd + 16)?);
        // torch always writes the zip64 records; they are mandatory past 4 GiB or 65535 entries.
        if eocd >= 20 && le::<4>(b, eocd - 20)? == u64::from(ZIP64_LOCATOR) {
            let rec = le::<8>(b, eocd - 12)?;
            if le::<4>(b, rec)? != u64::from(ZIP64_EOCD) {
                return Err("corrupt zip64 end-of-central-directory record".into());
            }
            (count, cd_offset) = (le::<8>(b, rec + 32)?, le::<8>(b, rec + 48)?);
        } else if count == 0xFFFF || cd_offset == 0xFFFF_FFFF {
            return Err("zip64 archive without its zip64 locator: truncated or corrupt".into());
        }

        // No capacity from `count`: it is untrusted. Each entry is at least 46 bytes, so a
        // bogus count fails on the first read past the end.
        let mut entries = HashMap::new();
        let mut at = cd_offset;
        for _ in 0..count {
            if le::<4>(b, at)? != u64::from(CENTRAL) {
                return Err(format!("corrupt zip central directory at byte {at}"));
            }
            let (name_len, extra_len, comment_len) =
                (le::<2>(b, at + 28)?, le::<2>(b, at + 30)?, le::<2>(b, at + 32)?);
            let name_at = at + 46;
            let name = b
                .get(name_at as usize..(name_at + name_len) as usize)
                .ok_or("truncated zip central directory")?;
            let mut e = Entry {
                method: le::<2>(b, at + 10)?,
                flags: le::<2>(b, at + 8)?,
                compressed: le::<4>(b, at + 20)?,
                size: le::<4>(b, at + 24)?,
                header: le::<4>(b, at + 42)?,
            };
            read_zip64_extra(b, name_at + name_len, extra_len, &mut e)?;
            entries.insert(String::from_utf8_lossy(name).into_owned(), e);
            at = name_at + name_len + extra_len + comment_len;
        }
        Ok(Zip { entries })
    }

    /// The top folder holding `data.pkl`: "archive/" by default, but torch names it after
    /// the file it saved to, so it can be anything.
    fn prefix(&self) -> Msg<String> {
        let mut found = self
            .entries
            .keys()
            .filter_map(|n| n.strip_suffix("data.pkl"))
            .filter(|p| p.ends_with('/') && p.matches('/').count() == 1);
        match (found.next(), found.next()) {
            (Some(p), None) => Ok(p.to_string()),
            (None, _) => Err("zip archive without `<folder>/data.pkl`: not a PyTorch checkpoint".into()),
            (Some(_), Some(_)) => Err("zip archive holds several `<folder>/data.pkl`".into()),
        }
    }

    /// Where the bytes of entry `name` lie, if it exists: after its local header, whose
    /// name and extra field (torch pads it to align the data) may differ from the central copy.
    fn find(&self, b: &[u8], name: &str) -> Msg<Option<Range<usize>>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        if e.method != 0 {
            return Err(format!(
                "zip entry `{name}` is compressed (method {}); only stored entries are supported (torch.save stores)",
                e.method
            ));
        }
        if e.flags & 1 != 0 {
            return Err(format!("zip entry `{name}` is encrypted"));
        }
        if e.compressed != e.size {
            return Err(format!("corrupt zip entry `{name}`: stored sizes disagree"));
        }
        if le::<4>(b, e.header)? != u64::from(LOCAL) {
            return Err(format!("corrupt zip local header for `{name}` at byte {}", e.header));
        }
        let start = e.header + 30 + le::<2>(b, e.header + 26)? + le::<2>(b, e.header + 28)?;
        match start.checked_add(e.size).filter(|&end| end <= b.len() as u64) {
            Some(end) => Ok(Some(start as usize..end as usize)),
            None => Err(format!("zip entry `{name}` runs past the end of the file: truncated")),
        }
    }
}

/// Fields saturated at 0xFFFFFFFF in the central directory are stored, in this order,
/// in the zip64 extra field (id 1).
fn read_zip64_extra(b: &[u8], mut at: u64, len: u64, e: &mut Entry) -> Msg<()> {
    let end = at + len;
    while at + 4 <= end {
        let (id, size) = (le::<2>(b, at)?, le::<2>(b, at + 2)?);
        if id == 1 {
            let mut field = at + 4;
            for value in [&mut e.size, &mut e.compressed, &mut e.header] {
                if *value == 0xFFFF_FFFF {
                    if field + 8 > at + 4 + size {
                        return Err("corrupt zip64 extra field".into());
                    }
                    *value = le::<8>(b, field)?;
                    field += 8;
                }
            }
        }
        at += 4 + size;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pickle: an allow-listed subset of protocols 2-5, enough for torch state dicts.

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

struct StorageRef {
    dtype: DType,
    key: String,
    numel: usize,
}

struct TensorRef {
    storage: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Default)]
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    seqs: Vec<Vec<Value>>, // tuples and lists
    dicts: Vec<Vec<(Value, Value)>>,
    storages: Vec<StorageRef>,
    tensors: Vec<TensorRef>,
}

impl<'a> Unpickler<'a> {
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
        let t = TensorRef {
            storage: *storage,
            offset: non_negative(offset)?,
            shape: self.tuple(shape)?.iter().map(non_negative).collect::<Msg<_>>()?,
            stride: self.tuple(stride)?.iter().map(non_negative).collect::<Msg<_>>()?,
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
                (*dtype, key.to_string(), non_negative(numel)?)
            }
            other => return Err(format!("unsupported persistent id {other:?}")),
        };
        self.storages.push(StorageRef { dtype, key, numel });
        Ok(Value::Storage(self.storages.len() - 1))
    }

    /// The tensors of the state dict: the top-level dict if it holds any tensors, else
    /// its one nested dict that does (`{"state_dict": {...}, "epoch": 3}`).
    /// Non-tensor entries are skipped.
    fn state_dict(&self, root: &Value) -> Msg<Vec<(String, usize)>> {
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

    fn tensors_in(&self, dict: usize) -> Msg<Vec<(String, usize)>> {
        let mut out = Vec::new();
        for (k, v) in &self.dicts[dict] {
            match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => out.push((k.to_string(), *t)),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits the pickle opcodes torch.save uses for a state dict of plain tensors.
    #[derive(Default)]
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn op(&mut self, bytes: &[u8]) -> &mut Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
        }
        fn int(&mut self, i: usize) -> &mut Self {
            match i {
                0..=0xFF => self.op(&[b'K', i as u8]),
                0x100..=0xFFFF => self.op(b"M").op(&(i as u16).to_le_bytes()),
                _ => self.op(b"J").op(&(i as i32).to_le_bytes()),
            }
        }
        fn ints(&mut self, v: &[usize]) -> &mut Self {
            self.op(b"(");
            for &i in v {
                self.int(i);
            }
            self.op(b"t")
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
        }
        fn tensor(&mut self, t: &T) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b"((").str("storage");
            self.global("torch", t.storage).str(t.key).str("cpu").int(t.numel).op(b"tQ");
            self.int(t.offset).ints(t.shape).ints(t.stride).op(b"\x89");
            self.global("collections", "OrderedDict").op(b")Rt").op(b"R")
        }
    }

    struct T<'a> {
        name: &'a str,
        storage: &'a str,
        key: &'a str,
        numel: usize,
        offset: usize,
        shape: &'a [usize],
        stride: &'a [usize],
    }

    impl<'a> T<'a> {
        /// A view into f32 storage "0", which holds just the elements up to the view's end.
        fn new(name: &'a str, offset: usize, shape: &'a [usize], stride: &'a [usize]) -> Self {
            let numel = offset + shape.iter().product::<usize>();
            T { name, storage: "FloatStorage", key: "0", numel, offset, shape, stride }
        }
    }

    fn state_dict(ts: &[T]) -> Vec<u8> {
        let mut p = Pickle::default();
        p.op(b"\x80\x02}q\x00(");
        for t in ts {
            p.str(t.name).tensor(t);
        }
        std::mem::take(&mut p.op(b"u.").0)
    }

    /// Appends little-endian fields given as (value, width in bytes).
    fn put(out: &mut Vec<u8>, fields: &[(u64, usize)]) {
        for &(v, n) in fields {
            out.extend_from_slice(&v.to_le_bytes()[..n]);
        }
    }

    /// A zip of stored entries (name, data, method), laid out like torch's: data aligned to
    /// 64 bytes through local extra padding, and a trailing archive comment. CRCs are left 0.
    fn zip(entries: &[(String, Vec<u8>, u16)], zip64: bool) -> Vec<u8> {
        let (mut out, mut central) = (Vec::new(), Vec::new());
        for (name, data, method) in entries {
            let (offset, size, method) = (out.len() as u64, data.len() as u64, u64::from(*method));
            let name_len = name.len() as u64;
            let pad = (64 - (offset + 30 + name_len + 4) % 64) % 64;
            put(&mut out, &[(LOCAL.into(), 4), (20, 2), (0, 2), (method, 2), (0, 8), (size, 4), (size, 4)]);
            put(&mut out, &[(name_len, 2), (4 + pad, 2)]);
            out.extend_from_slice(name.as_bytes());
            put(&mut out, &[(0x4246, 2), (pad, 2)]);
            out.resize(out.len() + pad as usize, 0);
            out.extend_from_slice(data);

            // zip64: the 32-bit fields saturate and the real values move to the extra field.
            let (size32, offset32, extra_len) =
                if zip64 { (0xFFFF_FFFF, 0xFFFF_FFFF, 28) } else { (size, offset, 0) };
            put(
                &mut central,
                &[(CENTRAL.into(), 4), (45, 2), (45, 2), (0, 2), (method, 2), (0, 8), (size32, 4)],
            );
            put(&mut central, &[(size32, 4), (name_len, 2), (extra_len, 2), (0, 4), (0, 6), (offset32, 4)]);
            central.extend_from_slice(name.as_bytes());
            if zip64 {
                put(&mut central, &[(1, 2), (24, 2), (size, 8), (size, 8), (offset, 8)]);
            }
        }
        let (count, cd_offset, cd_size) = (entries.len() as u64, out.len() as u64, central.len() as u64);
        out.extend_from_slice(&central);
        if zip64 {
            let record = out.len() as u64;
            put(
                &mut out,
                &[(ZIP64_EOCD.into(), 4), (44, 8), (45, 2), (45, 2), (0, 8), (count, 8), (count, 8)],
            );
            put(
                &mut out,
                &[(cd_size, 8), (cd_offset, 8), (ZIP64_LOCATOR.into(), 4), (0, 4), (record, 8), (1, 4)],
            );
        }
        let (count16, cd32) = if zip64 { (0xFFFF, 0xFFFF_FFFF) } else { (count, cd_offset) };
        let comment = b"written by a test";
        put(&mut out, &[(EOCD.into(), 4), (0, 4), (count16, 2), (count16, 2), (cd_size, 4), (cd32, 4)]);
        put(&mut out, &[(comment.len() as u64, 2)]);
        out.extend_from_slice(comment);
        out
    }

    fn pth(prefix: &str, pickle: Vec<u8>, storages: &[(&str, Vec<u8>)], zip64: bool) -> Vec<u8> {
        let mut entries = vec![(format!("{prefix}/data.pkl"), pickle, 0)];
        entries.push((format!("{prefix}/byteorder"), b"little".to_vec(), 0));
        entries.extend(storages.iter().map(|(k, d)| (format!("{prefix}/data/{k}"), d.clone(), 0)));
        zip(&entries, zip64)
    }

    fn open_bytes(bytes: &[u8]) -> Result<PthFile> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pth-test-{}-{n}.pth", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = PthFile::open(&path);
        std::fs::remove_file(&path).unwrap(); // the mapping outlives the name
        f
    }

    fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
        v.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    fn err(r: Result<PthFile>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    /// A 1-D tensor filling its own storage.
    fn vector<'a>(name: &'a str, storage: &'a str, key: &'a str, shape: &'a [usize]) -> T<'a> {
        T { storage, key, ..T::new(name, 0, shape, &[1]) }
    }

    /// One tensor of each storage type, files with or without zip64 and any folder name.
    fn three_dtypes(prefix: &str, zip64: bool) -> Vec<u8> {
        let ts = [
            vector("a.bf16", "BFloat16Storage", "0", &[3]),
            vector("b.f16", "HalfStorage", "1", &[2]),
            vector("c.f32", "FloatStorage", "2", &[2]),
        ];
        let storages = [("0", vec![1, 2, 3, 4, 5, 6]), ("1", vec![7, 8, 9, 10]), ("2", f32s([1.5, -2.0]))];
        pth(prefix, state_dict(&ts), &storages, zip64)
    }

    #[test]
    fn dtypes_prefixes_and_zip64() {
        for (prefix, zip64) in [("archive", false), ("my_model-v2", false), ("archive", true), ("x", true)] {
            let f = open_bytes(&three_dtypes(prefix, zip64)).unwrap();
            assert_eq!(f.names(), ["a.bf16", "b.f16", "c.f32"]);
            assert_eq!(f.info("a.bf16"), Some(TensorInfo { dtype: DType::BF16, shape: vec![3] }));
            assert_eq!(f.info("b.f16"), Some(TensorInfo { dtype: DType::F16, shape: vec![2] }));
            assert_eq!(f.info("c.f32"), Some(TensorInfo { dtype: DType::F32, shape: vec![2] }));
            assert_eq!(&*f.read("a.bf16").unwrap(), &[1, 2, 3, 4, 5, 6]);
            assert_eq!(&*f.read("b.f16").unwrap(), &[7, 8, 9, 10]);
            assert_eq!(&*f.read("c.f32").unwrap(), &f32s([1.5, -2.0])[..]);
            assert!(f.read("missing").is_err() && f.info("missing").is_none());
        }
    }

    #[test]
    fn shared_storage_views() {
        let st = |name, offset, shape, stride| T { numel: 12, ..T::new(name, offset, shape, stride) };
        let ts = [
            st("head", 0, &[4], &[1]),
            st("block", 4, &[2, 3], &[3, 1]),
            st("transposed", 0, &[3, 2], &[1, 3]), // the first 2x3 block, transposed
            st("sliced", 1, &[3, 2], &[4, 1]),     // columns 1..3 of a 3x4 matrix
            st("scalar", 11, &[], &[]),
            st("empty", 0, &[0, 5], &[5, 1]),
        ];
        let f =
            open_bytes(&pth("archive", state_dict(&ts), &[("0", f32s((0..12).map(|i| i as f32)))], false))
                .unwrap();
        let read = |n| f.read(n).unwrap();
        assert!(matches!(read("head"), Cow::Borrowed(_)) && matches!(read("transposed"), Cow::Owned(_)));
        assert_eq!(&*read("head"), &f32s([0., 1., 2., 3.])[..]);
        assert_eq!(&*read("block"), &f32s([4., 5., 6., 7., 8., 9.])[..]);
        assert_eq!(f.info("transposed").unwrap().shape, [3, 2]);
        assert_eq!(&*read("transposed"), &f32s([0., 3., 1., 4., 2., 5.])[..]);
        assert_eq!(&*read("sliced"), &f32s([1., 2., 5., 6., 9., 10.])[..]);
        assert_eq!(f.info("scalar").unwrap().shape, Vec::<usize>::new());
        assert_eq!(&*read("scalar"), &f32s([11.])[..]);
        assert!(read("empty").is_empty());
    }

    #[test]
    fn view_outside_storage_is_rejected() {
        let ts = [T { numel: 4, ..T::new("w", 1, &[2, 2], &[2, 1]) }];
        let msg = err(open_bytes(&pth("archive", state_dict(&ts), &[("0", f32s([0.; 4]))], false)));
        assert!(msg.contains("tensor `w`") && msg.contains("past the end"), "{msg}");
        // The storage entry must hold exactly `numel` elements.
        let ts = [vector("w", "FloatStorage", "0", &[4])];
        let msg = err(open_bytes(&pth("archive", state_dict(&ts), &[("0", f32s([0.; 3]))], false)));
        assert!(msg.contains("tensor `w`"), "{msg}");
    }

    #[test]
    fn nested_state_dict_and_non_tensor_values() {
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(").str("epoch").int(3).str("model").op(b"}(").str("step").int(7);
        p.str("w").tensor(&vector("w", "FloatStorage", "0", &[1])).op(b"uu.");
        let f = open_bytes(&pth("archive", p.0, &[("0", f32s([2.0]))], false)).unwrap();
        assert_eq!(f.names(), ["w"]);
    }

    #[test]
    fn training_checkpoint_without_weights_is_named() {
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(")
            .str("epoch")
            .int(3)
            .str("optimizer")
            .op(b"}(")
            .str("state")
            .op(b"}")
            .str("lr")
            .int(1)
            .op(b"uu.");
        let msg = err(open_bytes(&pth("archive", p.0, &[], false)));
        assert!(msg.contains("a training checkpoint") && msg.contains("optimizer state"), "{msg}");
    }

    #[test]
    fn forbidden_globals_are_rejected() {
        let mut p = Pickle::default();
        p.op(b"\x80\x02").global("os", "system").str("echo hi").op(b"\x85R.");
        let msg = err(open_bytes(&pth("archive", p.0, &[], false)));
        assert!(msg.contains("os.system"), "{msg}");
        let ts = [vector("w", "DoubleStorage", "0", &[1])];
        let msg = err(open_bytes(&pth("archive", state_dict(&ts), &[("0", vec![0; 8])], false)));
        assert!(msg.contains("torch.DoubleStorage"), "{msg}");
    }

    #[test]
    fn compressed_and_big_endian_are_rejected() {
        let pickle = state_dict(&[vector("w", "FloatStorage", "0", &[1])]);
        let mut entries =
            vec![("archive/data.pkl".into(), pickle, 0), ("archive/data/0".into(), f32s([1.0]), 8)];
        let msg = err(open_bytes(&zip(&entries, false)));
        assert!(msg.contains("compressed"), "{msg}");
        entries[1].2 = 0;
        entries.push(("archive/byteorder".into(), b"big".to_vec(), 0));
        let msg = err(open_bytes(&zip(&entries, false)));
        assert!(msg.contains("big-endian"), "{msg}");
    }

    #[test]
    fn truncated_or_corrupt_files_never_panic() {
        for zip64 in [false, true] {
            let good = three_dtypes("archive", zip64);
            for len in 0..good.len() {
                assert!(open_bytes(&good[..len]).is_err(), "truncated to {len} bytes");
            }
            // Corrupt one byte at a time: an error or a readable file, never a panic.
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0xFF;
                if let Ok(f) = open_bytes(&bad) {
                    f.names().iter().for_each(|n| drop(f.read(n)));
                }
            }
        }
    }

    /// The real checkpoints shipped with the tests, against their safetensors twins.
    #[test]
    fn golden_checkpoints_match_safetensors() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        for dir in ["tiny-rwkv7", "trained-bytes"] {
            let (pth, st) = (data.join(dir).join("model.pth"), data.join(dir).join("model.safetensors"));
            if !pth.exists() || !st.exists() {
                eprintln!("skipping {dir}: no checkpoint");
                continue;
            }
            let f = PthFile::open(&pth).unwrap();
            let bytes = std::fs::read(&st).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut names = f.names();
            names.sort();
            let mut expected: Vec<String> = st.names().into_iter().map(String::from).collect();
            expected.sort();
            assert_eq!(names, expected);
            for name in &names {
                let (info, t) = (f.info(name).unwrap(), st.tensor(name).unwrap());
                assert_eq!(info.shape, t.shape(), "{name}");
                assert_eq!(format!("{:?}", info.dtype), format!("{:?}", t.dtype()), "{name}");
                assert_eq!(&*f.read(name).unwrap(), t.data(), "{name}");
            }
            if dir == "tiny-rwkv7" {
                assert_eq!(
                    f.info("emb.weight"),
                    Some(TensorInfo { dtype: DType::BF16, shape: vec![512, 128] })
                );
                assert_eq!(names.len(), 72);
            }
        }
    }
}

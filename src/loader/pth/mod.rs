//! PyTorch `.pth` checkpoints: the zip layout `torch.save` has written since 1.6.
//!
//! The archive holds `<prefix>/data.pkl`, a pickle describing the state dict, and one
//! stored (uncompressed) entry `<prefix>/data/<key>` per storage. We memory-map the file,
//! read the zip directory ourselves, and interpret the pickle with a small allow-listed
//! unpickler: it never executes code, it only recognises the few globals a state dict of
//! f16/bf16/f32 tensors needs and rejects every other one by name.

mod pickle;
mod zip;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loader::bytes::FileBytes;
use crate::loader::{Checkpoint, TensorInfo};
use pickle::{TensorRef, Unpickler};
use zip::Zip;

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
    let mut up = Unpickler::new(&buf[pkl]);

    let mut names = Vec::new();
    let mut tensors = HashMap::new();
    for (name, t) in up.state_dict_tensors()? {
        let name = name.to_string();
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
        names.push(name.clone());
        tensors.insert(name, view);
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

#[cfg(test)]
mod tests {
    use super::zip::{CENTRAL, EOCD, LOCAL, ZIP64_EOCD, ZIP64_LOCATOR};
    use super::*;
    use crate::loader::DType;

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
    fn a_name_set_twice_keeps_its_place_and_takes_the_last_tensor() {
        let ts = [
            T { numel: 4, ..T::new("w", 0, &[2], &[1]) },
            T { numel: 4, ..T::new("v", 1, &[1], &[1]) },
            T { numel: 4, ..T::new("w", 2, &[2], &[1]) },
        ];
        let f =
            open_bytes(&pth("archive", state_dict(&ts), &[("0", f32s([0., 1., 2., 3.]))], false)).unwrap();
        assert_eq!(f.names(), ["w", "v"]);
        assert_eq!(&*f.read("w").unwrap(), &f32s([2., 3.])[..]);
    }

    /// Memoised values are shared: opcodes that call a memoised function on memoised
    /// arguments over and over cost bounded memory each, and the count is capped.
    #[test]
    fn memoised_arguments_cannot_multiply_memory() {
        let ones = [1; 16];
        let t = T { numel: 1, ..T::new("w", 0, &ones, &ones) };
        let mut p = Pickle::default();
        p.op(b"\x80\x02}(").str("w").global("torch._utils", "_rebuild_tensor_v2").op(b"q\x01((");
        p.str("storage").global("torch", t.storage).str(t.key).str("cpu").int(t.numel).op(b"tQ");
        p.int(0).ints(t.shape).ints(t.stride).op(b"\x89");
        p.global("collections", "OrderedDict").op(b")Rtq\x02R");
        for _ in 0..(1 << 18) {
            p.op(b"h\x01h\x02R"); // one more 16-dimensional tensor from 5 bytes
        }
        p.op(b"u.");
        let msg = err(open_bytes(&pth("archive", p.0, &[("0", f32s([0.]))], false)));
        assert!(msg.contains("more than 262144 tensors"), "{msg}");

        // Too many dimensions, too many arguments.
        let many = [1; 17];
        let ts = [T::new("w", 0, &many, &many)];
        let msg = err(open_bytes(&pth("archive", state_dict(&ts), &[("0", f32s([0.]))], false)));
        assert!(msg.contains("a tensor of 17 dimensions: at most 16"), "{msg}");
        let mut p = Pickle::default();
        p.op(b"\x80\x02").global("torch._utils", "_rebuild_tensor_v2").ints(&[0; 9]).op(b"R.");
        let msg = err(open_bytes(&pth("archive", p.0, &[], false)));
        assert!(msg.contains("with 9 arguments"), "{msg}");
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

//! One checkpoint file, opened for reading tensor by tensor: its tensor list (names, shapes,
//! element types) comes from the header or pickle at open; values are read on request.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::pickle::{Id, Pickle, Value};
use super::torch::{DType, Entry, TensorRef, TorchFile};
use crate::base::params::HostTensor;
use crate::error::{Error, Result, io_err};

/// A safetensors header larger than this is refused (real headers are well under 1 MiB).
const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;

/// Element type of a stored tensor. Float types are read as f32; the others only listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F64,
    F32,
    F16,
    BF16,
    /// An integer, bool or 8-bit float type, named as the file names it.
    Other(&'static str),
}

impl ElemType {
    pub fn is_float(self) -> bool {
        !matches!(self, ElemType::Other(_))
    }
}

/// A tensor as the file lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: ElemType,
}

enum Source {
    /// Absolute byte offset of each tensor (same order as `infos`); the file is read at those.
    Safetensors { file: Mutex<File>, offsets: Vec<u64> },
    /// Lazy tensors of a PyTorch checkpoint (same order as `infos`).
    Pytorch { file: TorchFile, tensors: Vec<TensorRef> },
}

/// An opened checkpoint: a safetensors file or a PyTorch (`torch.save`) checkpoint, told apart
/// by content. For a checkpoint holding a `state_dict` entry (Lightning), only the entries under
/// it are listed, without the `state_dict.` prefix; everything else in the file is ignored.
pub struct Checkpoint {
    path: PathBuf,
    infos: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    /// Entries of a PyTorch state dict that are not tensors, with what they are instead.
    objects: Vec<(String, String)>,
    source: Source,
}

fn not_found(path: &Path) -> Error {
    Error::usage(format!("{}: file not found", path.display()))
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    let what = what.to_string().replace('\n', " ");
    Error::usage(format!(
        "{}: {what}; the file is truncated or corrupt: re-download or re-export it",
        path.display()
    ))
}

impl Checkpoint {
    /// Opens `path` and lists its tensors; reads no tensor values.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => not_found(path),
            _ => io_err(path, e),
        })?;
        if file.metadata().map_err(|e| io_err(path, e))?.is_dir() {
            return Err(Error::usage(format!(
                "{}: is a directory, expected a checkpoint file",
                path.display()
            )));
        }
        let mut head = [0u8; 9];
        let n = read_up_to(&mut file, &mut head).map_err(|e| io_err(path, e))?;
        if n == 9 && head[8] == b'{' {
            Self::open_safetensors(path, file)
        } else {
            drop(file);
            Self::open_pytorch(path)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor in the file, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }

    /// Entries of the state dict that are not tensors (an int, a Python object), sorted by
    /// name, with what each is; [`Checkpoint::read_f32`] refuses them by name.
    pub fn objects(&self) -> &[(String, String)] {
        &self.objects
    }

    /// The name of every entry, tensors first, then the other objects.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.iter().map(|t| t.name.as_str()).chain(self.objects.iter().map(|o| o.0.as_str()))
    }

    /// Reads one float tensor as f32 (f64/f16/bf16 converted), checking that it is finite.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let path = &self.path;
        let Some(&i) = self.index.get(name) else {
            if let Some((_, what)) = self.objects.iter().find(|o| o.0 == name) {
                return Err(Error::usage(format!(
                    "{}: `{name}` is {what}, not a tensor; this is not a plain checkpoint of the model's weights: use the file as published",
                    path.display()
                )));
            }
            return Err(Error::usage(format!("{}: has no tensor `{name}`", path.display())));
        };
        let info = &self.infos[i];
        if !info.dtype.is_float() {
            let ElemType::Other(t) = info.dtype else { unreachable!() };
            return Err(Error::usage(format!(
                "{}: tensor `{name}` has element type {t}, expected a float type; is this the right file?",
                path.display()
            )));
        }
        let numel: usize = info.shape.iter().product();
        let byte_len = numel * elem_size(info.dtype);
        let (bytes, little_endian) = match &self.source {
            Source::Safetensors { file, offsets } => {
                let mut buf = vec![0u8; byte_len];
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                f.seek(SeekFrom::Start(offsets[i]))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| corrupt(path, format!("tensor `{name}` could not be read ({e})")))?;
                (buf, true)
            }
            Source::Pytorch { file, tensors } => {
                let (buf, little_endian) = file
                    .read(&tensors[i])
                    .map_err(|e| corrupt(path, format!("tensor `{name}` could not be read ({e})")))?;
                debug_assert_eq!(buf.len(), byte_len);
                (buf, little_endian)
            }
        };
        let data = decode_f32(&bytes, info.dtype, little_endian);
        drop(bytes);
        if data.iter().any(|v| !v.is_finite()) {
            return Err(corrupt(path, format!("tensor `{name}` contains NaN or infinite values")));
        }
        Ok(HostTensor { shape: info.shape.clone(), data })
    }

    fn from_infos(
        path: &Path,
        mut entries: Vec<(TensorInfo, usize)>,
        source: impl FnOnce(Vec<usize>) -> Source,
    ) -> Self {
        entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let order: Vec<usize> = entries.iter().map(|e| e.1).collect();
        let infos: Vec<TensorInfo> = entries.into_iter().map(|e| e.0).collect();
        let index = infos.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Self { path: path.to_path_buf(), infos, index, objects: Vec::new(), source: source(order) }
    }

    fn open_safetensors(path: &Path, mut file: File) -> Result<Self> {
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let bad = |what: String| corrupt(path, format!("not a valid safetensors file ({what})"));
        let mut len8 = [0u8; 8];
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_exact(&mut len8))
            .map_err(|e| bad(e.to_string()))?;
        let header_len = u64::from_le_bytes(len8);
        if header_len > MAX_SAFETENSORS_HEADER || 8 + header_len > file_len {
            return Err(bad(format!("header of {header_len} bytes in a file of {file_len} bytes")));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let mut entries = Vec::with_capacity(header.len());
        let mut offsets = Vec::with_capacity(header.len());
        for (name, value) in &header {
            if name == "__metadata__" {
                continue;
            }
            let bad_entry = |what: &str| bad(format!("tensor `{name}`: {what}"));
            let dtype = value.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad_entry("no dtype"))?;
            let dtype =
                safetensors_dtype(dtype).ok_or_else(|| bad_entry(&format!("unknown dtype {dtype}")))?;
            let shape: Vec<usize> = value
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>())
                .ok_or_else(|| bad_entry("no shape"))?;
            let range: Vec<u64> = value
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<_>>())
                .filter(|r: &Vec<u64>| r.len() == 2 && r[0] <= r[1])
                .ok_or_else(|| bad_entry("no valid data_offsets"))?;
            let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
            let expected = numel.and_then(|n| n.checked_mul(elem_size(dtype) as u64));
            if expected != Some(range[1] - range[0]) {
                return Err(bad_entry(&format!(
                    "shape {shape:?} does not match its {} data bytes",
                    range[1] - range[0]
                )));
            }
            if data_start + range[1] > file_len {
                return Err(bad_entry(&format!(
                    "data ends at byte {} but the file has {file_len} bytes",
                    data_start + range[1]
                )));
            }
            offsets.push(data_start + range[0]);
            entries.push((TensorInfo { name: name.clone(), shape, dtype }, entries.len()));
        }
        Ok(Self::from_infos(path, entries, |order| Source::Safetensors {
            file: Mutex::new(file),
            offsets: order.iter().map(|&i| offsets[i]).collect(),
        }))
    }

    fn open_pytorch(path: &Path) -> Result<Self> {
        let file = TorchFile::open(path)
            .map_err(|e| corrupt(path, format!("cannot be read as a PyTorch checkpoint ({e})")))?;
        let p = &file.pickle;
        if !matches!(p.value(p.root), Value::Dict(_)) {
            return Err(Error::usage(format!(
                "{}: holds {}, not a dict of tensors; expected a state_dict or a Lightning checkpoint",
                path.display(),
                p.describe(p.root)
            )));
        }
        // A Lightning checkpoint keeps the weights under `state_dict`, beside training state.
        let weights =
            p.get(p.root, "state_dict").filter(|&id| matches!(p.value(id), Value::Dict(_))).unwrap_or(p.root);
        let mut found = Vec::new();
        collect_leaves(p, weights, &mut Vec::new(), &mut Vec::new(), &mut found);
        let mut entries = Vec::new();
        let mut lazy = Vec::new();
        let mut objects = Vec::new();
        for (name, id) in found {
            match file.entry(id) {
                Entry::Tensor(t) => {
                    let info = TensorInfo { name, shape: t.shape.clone(), dtype: torch_dtype(t.dtype) };
                    entries.push((info, lazy.len()));
                    lazy.push(Some(t));
                }
                Entry::Other(what) => objects.push((name, what)),
            }
        }
        objects.sort();
        let mut ckpt = Self::from_infos(path, entries, |order| Source::Pytorch {
            tensors: order.iter().map(|&i| lazy[i].take().expect("each tensor once")).collect(),
            file,
        });
        ckpt.objects = objects;
        Ok(ckpt)
    }
}

/// The leaves under `id` with their dotted paths: dicts descended by key (a str, an int, a
/// class by its name), lists and tuples by index, as `state_dict()` names nested modules. Every
/// other value, a tensor or not, is a leaf; a container met again on its own path (a pickle
/// can build cycles) is not descended twice, nor one nested deeper than any checkpoint nests.
fn collect_leaves(
    p: &Pickle,
    id: Id,
    path: &mut Vec<String>,
    open: &mut Vec<Id>,
    out: &mut Vec<(String, Id)>,
) {
    const MAX_DEPTH: usize = 64;
    let children: Vec<(Option<String>, Id)> = match p.value(id) {
        Value::Dict(pairs) => pairs.iter().map(|&(k, v)| (key_name(p, k), v)).collect(),
        Value::List(items) | Value::Tuple(items) => {
            items.iter().enumerate().map(|(i, &v)| (Some(i.to_string()), v)).collect()
        }
        _ => {
            out.push((path.join("."), id));
            return;
        }
    };
    if open.contains(&id) || path.len() >= MAX_DEPTH {
        return;
    }
    open.push(id);
    for (key, child) in children {
        let Some(key) = key else { continue };
        path.push(key);
        collect_leaves(p, child, path, open, out);
        path.pop();
    }
    open.pop();
}

fn key_name(p: &Pickle, key: Id) -> Option<String> {
    match p.value(key) {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Bool(b) => Some(if *b { "True" } else { "False" }.into()),
        _ => p.global_name(key),
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn elem_size(t: ElemType) -> usize {
    match t {
        ElemType::F64 => 8,
        ElemType::F32 => 4,
        ElemType::F16 | ElemType::BF16 => 2,
        ElemType::Other(name) => match name {
            "I64" | "U64" => 8,
            "I32" | "U32" => 4,
            "I16" | "U16" => 2,
            _ => 1,
        },
    }
}

fn safetensors_dtype(s: &str) -> Option<ElemType> {
    Some(match s {
        "F64" => ElemType::F64,
        "F32" => ElemType::F32,
        "F16" => ElemType::F16,
        "BF16" => ElemType::BF16,
        "I64" => ElemType::Other("I64"),
        "U64" => ElemType::Other("U64"),
        "I32" => ElemType::Other("I32"),
        "U32" => ElemType::Other("U32"),
        "I16" => ElemType::Other("I16"),
        "U16" => ElemType::Other("U16"),
        "I8" => ElemType::Other("I8"),
        "U8" => ElemType::Other("U8"),
        "BOOL" => ElemType::Other("BOOL"),
        "F8_E4M3" => ElemType::Other("F8_E4M3"),
        "F8_E5M2" => ElemType::Other("F8_E5M2"),
        _ => return None,
    })
}

fn torch_dtype(t: DType) -> ElemType {
    match t {
        DType::F64 => ElemType::F64,
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::BF16 => ElemType::BF16,
        DType::I64 => ElemType::Other("I64"),
        DType::I32 => ElemType::Other("I32"),
        DType::I16 => ElemType::Other("I16"),
        DType::I8 => ElemType::Other("I8"),
        DType::U8 => ElemType::Other("U8"),
        DType::Bool => ElemType::Other("BOOL"),
    }
}

fn decode_f32(bytes: &[u8], t: ElemType, little_endian: bool) -> Vec<f32> {
    let u16_of = |c: &[u8]| {
        if little_endian { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) }
    };
    match t {
        ElemType::F32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let b = [c[0], c[1], c[2], c[3]];
                if little_endian { f32::from_le_bytes(b) } else { f32::from_be_bytes(b) }
            })
            .collect(),
        ElemType::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().expect("8 bytes");
                (if little_endian { f64::from_le_bytes(b) } else { f64::from_be_bytes(b) }) as f32
            })
            .collect(),
        ElemType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16_of(c)).to_f32()).collect(),
        ElemType::BF16 => bytes.chunks_exact(2).map(|c| f32::from_bits((u16_of(c) as u32) << 16)).collect(),
        ElemType::Other(_) => unreachable!("checked by the caller"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::io::Write;

    /// A pickle (protocol 2) written opcode by opcode, for crafted PyTorch checkpoints.
    #[derive(Default)]
    pub(crate) struct Pickle(pub Vec<u8>);

    impl Pickle {
        pub fn new() -> Self {
            Self(vec![0x80, 2])
        }
        pub fn op(&mut self, op: u8) -> &mut Self {
            self.0.push(op);
            self
        }
        pub fn mark(&mut self) -> &mut Self {
            self.op(b'(')
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        pub fn int(&mut self, v: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(b'c');
            self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
        pub fn ints(&mut self, v: &[usize]) -> &mut Self {
            self.mark();
            for &x in v {
                self.int(x as i32);
            }
            self.op(b't')
        }
        /// `torch._utils._rebuild_tensor_v2` of storage `key` (`numel` elements of `storage`).
        pub fn tensor(
            &mut self,
            storage: &str,
            key: &str,
            numel: usize,
            offset: usize,
            size: &[usize],
            stride: &[usize],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").mark();
            self.mark()
                .str("storage")
                .global("torch", storage)
                .str(key)
                .str("cpu")
                .int(numel as i32)
                .op(b't')
                .op(b'Q');
            self.int(offset as i32).ints(size).ints(stride).op(0x89);
            self.global("collections", "OrderedDict").op(b')').op(b'R');
            self.op(b't').op(b'R')
        }
        pub fn finish(&mut self) -> Vec<u8> {
            self.op(b'.');
            std::mem::take(&mut self.0)
        }
    }

    /// Writes a PyTorch zip checkpoint: `archive/data.pkl` and `archive/data/<key>` entries.
    pub(crate) fn write_torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let opts =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/byteorder", opts).unwrap();
        zip.write_all(b"little").unwrap();
        for (key, bytes) in storages {
            zip.start_file(format!("archive/data/{key}"), opts).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.start_file("archive/version", opts).unwrap();
        zip.write_all(b"3\n").unwrap();
        zip.finish().unwrap();
    }

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect()
    }

    fn assert_usage_naming(err: Error, path: &Path, words: &[&str]) {
        assert_eq!(err.kind, ErrorKind::Usage, "{err}");
        assert!(err.message.contains(&path.display().to_string()), "{err}");
        assert!(!err.message.contains('\n'), "one line: {err}");
        for w in words {
            assert!(err.message.contains(w), "`{w}` missing from: {err}");
        }
    }

    #[test]
    fn lightning_zip_with_views_and_hostile_globals() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let cmd = format!("touch {}", marker.display());
        let path = dir.path().join("model.ckpt");
        let mut p = Pickle::new();
        // {'epoch': 3, 'evil': os.system(cmd), 'state_dict': {...}, 'callbacks': {'x': eval(..)}}
        p.op(b'}').mark();
        p.str("epoch").int(3);
        p.str("evil").global("os", "system").str(&cmd).op(0x85).op(b'R');
        p.str("state_dict").op(b'}').mark();
        // A transposed view of a 2x3 f16 storage, starting at element 1 of a 7-element storage.
        p.str("w.weight").tensor("HalfStorage", "0", 7, 1, &[3, 2], &[1, 3]);
        // A contiguous f32 tensor and an int64 buffer.
        p.str("w.bias").tensor("FloatStorage", "1", 2, 0, &[2], &[1]);
        p.str("ids").tensor("LongStorage", "2", 2, 0, &[1, 2], &[2, 1]);
        p.op(b'u');
        p.str("callbacks")
            .op(b'}')
            .str("x")
            .global("builtins", "eval")
            .str("__import__('os').system('true')")
            .op(0x85)
            .op(b'R')
            .op(b's');
        p.op(b'u');
        let pickle = p.finish();
        let storage0 = f16_bytes(&[9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let storage1: Vec<u8> = [0.5f32, -1.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let storage2: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        write_torch_zip(&path, &pickle, &[("0", storage0), ("1", storage1), ("2", storage2)]);

        let ckpt = Checkpoint::open(&path).unwrap();
        let names: Vec<&str> = ckpt.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["ids", "w.bias", "w.weight"]);
        assert_eq!(ckpt.info("ids").unwrap().dtype, ElemType::Other("I64"));
        let w = ckpt.read_f32("w.weight").unwrap();
        assert_eq!(w.shape, vec![3, 2]);
        // storage[1..7] as 2x3 row-major [[1,2,3],[4,5,6]], transposed.
        assert_eq!(w.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(ckpt.read_f32("w.bias").unwrap().data, vec![0.5, -1.5]);
        assert_usage_naming(ckpt.read_f32("ids").unwrap_err(), &path, &["ids", "I64"]);
        assert!(!marker.exists(), "the pickle's os.system call must never run");
    }

    #[test]
    fn a_pickle_that_is_only_a_call_is_refused_without_running_it() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let path = dir.path().join("evil.ckpt");
        let mut p = Pickle::new();
        p.global("os", "system").str(&format!("touch {}", marker.display())).op(0x85).op(b'R');
        write_torch_zip(&path, &p.finish(), &[]);
        assert_usage_naming(
            Checkpoint::open(&path).err().unwrap(),
            &path,
            &["a Python object built by os.system", "not a dict of tensors"],
        );
        assert!(!marker.exists());
    }

    /// pytorch-lightning 1.4 keys `callbacks` by the callback's class; inside `state_dict` a
    /// class key names its entry, a self-containing list is walked once, and a non-tensor entry
    /// is listed as an object that `read_f32` refuses by name.
    #[test]
    fn class_keys_cycles_and_objects_in_a_lightning_dict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pl14.ckpt");
        let mut p = Pickle::new();
        p.op(b'}').mark();
        p.str("callbacks")
            .op(b'}')
            .global("pytorch_lightning.callbacks", "ModelCheckpoint")
            .op(b'}')
            .op(b's');
        p.str("state_dict").op(b'}').mark();
        p.str("a.weight").tensor("FloatStorage", "0", 2, 0, &[2], &[1]);
        p.global("some.module", "Key").int(5);
        p.str("loop").op(b']').op(b'q').0.push(7);
        p.op(b'h').0.push(7);
        p.op(b'a');
        p.str("hp")
            .global("pl", "AttributeDict")
            .op(b')')
            .op(0x81)
            .str("lr")
            .int(1)
            .op(b's')
            .op(b'}')
            .op(b'b');
        p.op(b'u');
        p.op(b'u');
        write_torch_zip(
            &path,
            &p.finish(),
            &[("0", [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect())],
        );
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.tensors().len(), 1);
        assert_eq!(ckpt.read_f32("a.weight").unwrap().data, vec![1.0, 2.0]);
        let objects: Vec<&str> = ckpt.objects().iter().map(|o| o.0.as_str()).collect();
        assert_eq!(objects, ["hp", "some.module.Key"]);
        let names: Vec<&str> = ckpt.names().collect();
        assert_eq!(names, ["a.weight", "hp", "some.module.Key"]);
        assert_usage_naming(
            ckpt.read_f32("hp").unwrap_err(),
            &path,
            &["`hp`", "a Python object built by pl.AttributeDict", "not a tensor"],
        );
        assert_usage_naming(ckpt.read_f32("some.module.Key").unwrap_err(), &path, &["an int"]);
    }

    /// A view that reaches past its storage is refused when listed (named as what it is), and a
    /// storage entry missing from the archive fails when read, naming the tensor.
    #[test]
    fn views_past_their_storage_and_missing_storages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.ckpt");
        let mut p = Pickle::new();
        p.op(b'}').mark();
        p.str("long").tensor("FloatStorage", "0", 4, 2, &[3], &[1]);
        p.str("gone").tensor("FloatStorage", "1", 4, 0, &[4], &[1]);
        p.op(b'u');
        write_torch_zip(&path, &p.finish(), &[("0", vec![0u8; 16])]);
        let ckpt = Checkpoint::open(&path).unwrap();
        assert_eq!(ckpt.tensors().len(), 1);
        assert_usage_naming(ckpt.read_f32("long").unwrap_err(), &path, &["reaches past its storage"]);
        assert_usage_naming(ckpt.read_f32("gone").unwrap_err(), &path, &["gone", "data/1", "missing"]);
    }

    #[test]
    fn truncated_and_missing_files_are_usage_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A torch zip cut short loses its central directory.
        let path = dir.path().join("cut.ckpt");
        let mut p = Pickle::new();
        p.op(b'}').str("a").tensor("FloatStorage", "0", 4, 0, &[4], &[1]).op(b's');
        write_torch_zip(&path, &p.finish(), &[("0", vec![0u8; 16])]);
        let bytes = std::fs::read(&path).unwrap();
        assert!(Checkpoint::open(&path).is_ok());
        std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        assert_usage_naming(Checkpoint::open(&path).err().unwrap(), &path, &["truncated or corrupt"]);

        // A safetensors file cut inside its data.
        let path = dir.path().join("cut.safetensors");
        let data: Vec<u8> = (0..64u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 8], &data).unwrap();
        safetensors::serialize_to_file([("x.weight", view)], None, &path).unwrap();
        let ok = Checkpoint::open(&path).unwrap();
        assert_eq!(ok.read_f32("x.weight").unwrap().data[63], 63.0);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert_usage_naming(
            Checkpoint::open(&path).err().unwrap(),
            &path,
            &["x.weight", "truncated or corrupt"],
        );
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert_usage_naming(Checkpoint::open(&path).err().unwrap(), &path, &["truncated or corrupt"]);

        let missing = dir.path().join("nope.ckpt");
        assert_usage_naming(Checkpoint::open(&missing).err().unwrap(), &missing, &["not found"]);
    }

    #[test]
    fn safetensors_half_types_read_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.safetensors");
        let vals = [1.0f32, -2.5, 0.333_333, 65504.0];
        let f16 = f16_bytes(&vals);
        let bf16: Vec<u8> =
            vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
        let ids: Vec<u8> = [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = [
            ("a", safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2, 2], &f16).unwrap()),
            ("b", safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &bf16).unwrap()),
            ("c", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![3], &ids).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let a = ckpt.read_f32("a").unwrap();
        assert_eq!(a.shape, vec![2, 2]);
        for (x, y) in a.data.iter().zip(vals) {
            assert_eq!(*x, half::f16::from_f32(y).to_f32());
        }
        let b = ckpt.read_f32("b").unwrap();
        assert_eq!(b.data[1], -2.5);
        assert_eq!(ckpt.info("c").unwrap().dtype, ElemType::Other("I64"));
        assert!(ckpt.read_f32("c").is_err());
    }
}

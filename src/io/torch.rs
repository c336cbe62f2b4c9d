//! PyTorch checkpoints (`torch.save`) as published: the zip container (PyTorch >= 1.6) and the
//! legacy one (a run of pickles followed by the raw storages), read without running pickle code.
//!
//! The pickle is read by [`super::pickle`], which only describes calls. Here the few calls that
//! rebuild tensors (`torch._utils._rebuild_tensor{,_v2,_v3}`, `_rebuild_parameter*`,
//! `torch._tensor._rebuild_from_type_v2`) are interpreted as lazy tensors: a storage key, an
//! element type, an offset, a shape and strides, read from the file only when asked for.
//! Everything else (Lightning's callback classes as dict keys, hyper-parameter objects, a
//! hostile `os.system` call) stays a described value that nobody calls.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use super::pickle::{self, Id, Pickle, Value};

/// The element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// From a storage class (`torch.FloatStorage`) or dtype (`torch.float32`) name.
    fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name.strip_prefix("torch.")? {
            "DoubleStorage" | "float64" | "double" => DType::F64,
            "FloatStorage" | "float32" | "float" => DType::F32,
            "HalfStorage" | "float16" | "half" => DType::F16,
            "BFloat16Storage" | "bfloat16" => DType::BF16,
            "LongStorage" | "int64" | "long" => DType::I64,
            "IntStorage" | "int32" | "int" => DType::I32,
            "ShortStorage" | "int16" | "short" => DType::I16,
            "CharStorage" | "int8" => DType::I8,
            "ByteStorage" | "UntypedStorage" | "uint8" => DType::U8,
            "BoolStorage" | "bool" => DType::Bool,
            _ => return None,
        })
    }
}

/// A tensor as the pickle describes it; its bytes stay in the file until [`TorchFile::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    storage: String,
    pub dtype: DType,
    /// Elements from the start of the storage's bytes (a legacy view's offset included).
    offset: usize,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
}

/// What a value under a checkpoint key turned out to be.
pub enum Entry {
    Tensor(TensorRef),
    /// Not a tensor: what it is instead, for messages (`a Python object built by posix.system`).
    Other(String),
}

enum Storages {
    /// Entry `<prefix>data/<key>` of the archive, stored (uncompressed) as torch.save writes it:
    /// its data's absolute offset and length.
    Zip { entries: HashMap<String, Result<(u64, u64)>> },
    /// The legacy container: each storage's data offset and length, in the order written.
    Legacy { entries: HashMap<String, (u64, u64)> },
}

/// An opened PyTorch checkpoint: its pickle, and where each storage's bytes are.
pub struct TorchFile {
    pub pickle: Pickle,
    file: Mutex<File>,
    storages: Storages,
    little_endian: bool,
    /// Element type and element count of each storage, as its persistent ids declare them.
    declared: HashMap<String, (DType, usize)>,
}

/// Why a checkpoint could not be read; the caller adds the path.
pub type Result<T> = std::result::Result<T, String>;

/// `torch.serialization`'s legacy magic number, pickled as a LONG1.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

impl TorchFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let mut head = [0u8; 4];
        let n = file.read(&mut head).map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        if n == 4 && head == *b"PK\x03\x04" {
            Self::open_zip(file)
        } else if n >= 2 && head[0] == 0x80 {
            Self::open_legacy(file)
        } else {
            Err("not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle file)".into())
        }
    }

    fn open_zip(file: File) -> Result<Self> {
        let mut archive = zip::ZipArchive::new(file.try_clone().map_err(|e| e.to_string())?)
            .map_err(|e| format!("not a valid zip archive ({e})"))?;
        let names: Vec<String> = archive
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("zip entry names could not be read ({e})"))?;
        let pkl: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1 || n.as_str() == "data.pkl")
            .collect();
        let [pkl] = pkl[..] else {
            return Err(format!(
                "a torch.save archive has one `<name>/data.pkl`; this one has {}",
                pkl.len()
            ));
        };
        let prefix = pkl.strip_suffix("data.pkl").expect("filtered on it").to_string();
        let pickle = {
            let entry = archive.by_name(pkl).map_err(|e| format!("`{pkl}` could not be read ({e})"))?;
            let mut r = BufReader::new(entry);
            pickle::read(&mut r).map_err(|e| format!("`{pkl}`: {e}"))?
        };
        let little_endian = match archive.by_name(&format!("{prefix}byteorder")) {
            Ok(mut e) => {
                let mut s = String::new();
                e.read_to_string(&mut s).map_err(|e| format!("byteorder entry ({e})"))?;
                match s.trim() {
                    "little" => true,
                    "big" => false,
                    other => return Err(format!("byteorder entry says `{other}`")),
                }
            }
            Err(_) => true, // written before PyTorch recorded it: little-endian machines
        };
        let data_prefix = format!("{prefix}data/");
        let mut entries = HashMap::new();
        for name in &names {
            let Some(key) = name.strip_prefix(&data_prefix) else { continue };
            let e = archive.by_name(name).map_err(|e| format!("`{name}` could not be read ({e})"))?;
            let place = match (e.compression(), e.data_start()) {
                (zip::CompressionMethod::Stored, Some(start)) => Ok((start, e.size())),
                (method, _) => Err(format!(
                    "storage `{name}` is compressed ({method}); torch.save stores storages uncompressed: re-save the file with torch.save"
                )),
            };
            entries.insert(key.to_string(), place);
        }
        let declared = declared_storages(&pickle)?;
        Ok(Self {
            pickle,
            file: Mutex::new(file),
            storages: Storages::Zip { entries },
            little_endian,
            declared,
        })
    }

    fn open_legacy(file: File) -> Result<Self> {
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut r = BufReader::new(file);
        let mut next =
            |what: &str| pickle::read(&mut r).map_err(|e| format!("legacy torch.save {what}: {e}"));
        let magic = next("magic number")?;
        if magic.value(magic.root) != &Value::BigInt(LEGACY_MAGIC.to_vec()) {
            return Err("a pickle, but not a PyTorch checkpoint (no torch.save magic number)".into());
        }
        let version = next("protocol version")?;
        if version.value(version.root) != &Value::Int(1001) {
            return Err("legacy torch.save file of an unknown protocol version (expected 1001)".into());
        }
        next("system info")?;
        let pickle = next("object")?;
        let keys = next("storage list")?;
        let Value::List(ids) = keys.value(keys.root) else {
            return Err("legacy torch.save storage list is not a list".into());
        };
        let declared = declared_storages(&pickle)?;
        let mut at = r.stream_position().map_err(|e| e.to_string())?;
        let mut entries = HashMap::new();
        let mut file = r.into_inner();
        for &id in ids {
            let Value::Str(key) = keys.value(id) else {
                return Err("legacy torch.save storage key is not a string".into());
            };
            let Some(&(dtype, _)) = declared.get(key) else {
                return Err(format!("legacy storage `{key}` is listed but no tensor uses it"));
            };
            let mut numel = [0u8; 8];
            file.seek(SeekFrom::Start(at))
                .and_then(|_| file.read_exact(&mut numel))
                .map_err(|_| format!("legacy storage `{key}` lies past the end of the file"))?;
            let numel = u64::from_le_bytes(numel);
            let bytes = numel.checked_mul(dtype.size() as u64).filter(|b| at + 8 + b <= len);
            let Some(bytes) = bytes else {
                return Err(format!(
                    "legacy storage `{key}` ({numel} elements) runs past the end of the file"
                ));
            };
            entries.insert(key.clone(), (at + 8, bytes));
            at += 8 + bytes;
        }
        // torch writes legacy storages (and their element counts) little-endian on any machine.
        Ok(Self {
            pickle,
            file: Mutex::new(file),
            storages: Storages::Legacy { entries },
            little_endian: true,
            declared,
        })
    }

    /// The value `id` read as a tensor, or what it is instead.
    pub fn entry(&self, id: Id) -> Entry {
        match self.tensor(id) {
            Ok(Some(t)) => Entry::Tensor(t),
            Ok(None) => Entry::Other(self.pickle.describe(id)),
            Err(why) => Entry::Other(format!("a tensor msfp cannot read ({why})")),
        }
    }

    /// `Ok(None)` when `id` is no tensor at all; `Err` when it is one this reader cannot take.
    fn tensor(&self, mut id: Id) -> std::result::Result<Option<TensorRef>, String> {
        let p = &self.pickle;
        // A parameter wraps its data (a tensor, or a subclass wrapping one): unwrap a few levels.
        for _ in 0..4 {
            let Value::Call { callable, args, .. } = p.value(id) else { return Ok(None) };
            let Some(func) = p.global_name(*callable) else { return Ok(None) };
            let fields = match p.value(*args) {
                Value::Tuple(f) => f.as_slice(),
                _ => &[],
            };
            match func.as_str() {
                "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                    id = *fields.first().ok_or_else(|| format!("{func} without arguments"))?;
                }
                // (func, type, args, state): the tensor is func(*args); a subclass is its data.
                "torch._tensor._rebuild_from_type_v2" => {
                    let [inner, _, inner_args, ..] = fields else {
                        return Err(format!("{func} with {} arguments", fields.len()));
                    };
                    return self.rebuild(p.global_name(*inner).as_deref(), inner_args);
                }
                "torch._utils._rebuild_tensor"
                | "torch._utils._rebuild_tensor_v2"
                | "torch._utils._rebuild_tensor_v3" => return self.rebuild(Some(&func), args),
                f if f.starts_with("torch.") => return Err(format!("built by {f}")),
                _ => return Ok(None),
            }
        }
        Err("parameters nested in parameters".into())
    }

    /// `_rebuild_tensor*(storage, offset, size, stride, ...)`.
    fn rebuild(&self, func: Option<&str>, args: &Id) -> std::result::Result<Option<TensorRef>, String> {
        let p = &self.pickle;
        let Value::Tuple(f) = p.value(*args) else { return Err("tensor arguments are not a tuple".into()) };
        let func = func.unwrap_or("an unnamed function");
        let v3 = func == "torch._utils._rebuild_tensor_v3";
        if !matches!(func, "torch._utils._rebuild_tensor" | "torch._utils._rebuild_tensor_v2") && !v3 {
            return Err(format!("built by {func}"));
        }
        if f.len() < 4 || (v3 && f.len() < 7) {
            return Err(format!("{func} with {} arguments", f.len()));
        }
        let Value::Persistent(pid) = p.value(f[0]) else {
            return Err("its storage is not a persistent id".into());
        };
        let (key, storage_dtype, view_offset) = storage_id(p, *pid)?;
        let dtype = if v3 {
            p.global_name(f[6]).and_then(|n| DType::from_torch_name(&n)).ok_or("unknown dtype")?
        } else {
            storage_dtype
        };
        let offset = int(p, f[1]).ok_or("storage offset is not a non-negative int")?;
        let shape = ints(p, f[2]).ok_or("size is not a tuple of non-negative ints")?;
        let stride = ints(p, f[3]).ok_or("stride is not a tuple of non-negative ints")?;
        if shape.len() != stride.len() {
            return Err(format!("size {shape:?} and stride {stride:?} differ in rank"));
        }
        let t = TensorRef { storage: key, dtype, offset: offset + view_offset, shape, stride };
        let (_, numel) = *self.declared.get(&t.storage).ok_or("its storage is not declared")?;
        let fits = t.extent().zip(numel.checked_mul(storage_dtype.size())).is_some_and(|(e, bytes)| {
            e.checked_add(t.offset).and_then(|end| end.checked_mul(dtype.size())).is_some_and(|b| b <= bytes)
        });
        if !fits {
            return Err(format!(
                "a view of shape {:?} at offset {} reaches past its storage of {numel} elements",
                t.shape, t.offset
            ));
        }
        Ok(Some(t))
    }

    /// The tensor's bytes in row-major order (strided views gathered), and whether they are
    /// little-endian.
    pub fn read(&self, t: &TensorRef) -> Result<(Vec<u8>, bool)> {
        let (start, len) = match &self.storages {
            Storages::Zip { entries } => match entries.get(&t.storage) {
                Some(Ok(place)) => *place,
                Some(Err(why)) => return Err(why.clone()),
                None => return Err(format!("its storage `data/{}` is missing from the archive", t.storage)),
            },
            Storages::Legacy { entries } => *entries
                .get(&t.storage)
                .ok_or_else(|| format!("its storage `{}` is not in the file's storage list", t.storage))?,
        };
        let es = t.dtype.size();
        let extent = t.extent().expect("checked when listed");
        let (from, n) = ((t.offset * es) as u64, (extent * es) as u64);
        if from + n > len {
            return Err(format!(
                "its storage `{}` holds {len} bytes, the tensor needs {}",
                t.storage,
                from + n
            ));
        }
        let mut raw = vec![0u8; n as usize];
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.seek(SeekFrom::Start(start + from))
                .and_then(|_| f.read_exact(&mut raw))
                .map_err(|e| e.to_string())?;
        }
        let numel: usize = t.shape.iter().product();
        if t.is_contiguous() {
            raw.truncate(numel * es);
            return Ok((raw, self.little_endian));
        }
        let mut out = Vec::with_capacity(numel * es);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let at: usize = index.iter().zip(&t.stride).map(|(i, s)| i * s).sum();
            out.extend_from_slice(&raw[at * es..(at + 1) * es]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok((out, self.little_endian))
    }
}

impl TensorRef {
    /// Elements from the first to one past the last that the view touches (0 when empty).
    fn extent(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        self.shape
            .iter()
            .zip(&self.stride)
            .try_fold(1usize, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?))
    }

    fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }
}

/// `('storage', torch.XStorage, key, location, numel[, view])`: the key, the storage's element
/// type and, for a legacy view `(view_key, offset, size)`, the view's element offset.
fn storage_id(p: &Pickle, pid: Id) -> std::result::Result<(String, DType, usize), String> {
    let Value::Tuple(f) = p.value(pid) else { return Err("its persistent id is not a tuple".into()) };
    let [tag, storage_type, key, _location, _numel, rest @ ..] = f.as_slice() else {
        return Err(format!("its persistent id has {} fields", f.len()));
    };
    if p.value(*tag) != &Value::Str("storage".into()) {
        return Err("its persistent id is not a storage".into());
    }
    let name = p.global_name(*storage_type).ok_or("its storage type is not a class")?;
    let dtype = DType::from_torch_name(&name).ok_or_else(|| format!("storage type {name}"))?;
    let key = match p.value(*key) {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return Err("its storage key is not a string".into()),
    };
    let view_offset = match rest.first().map(|&v| p.value(v)) {
        None | Some(Value::None) => 0,
        Some(Value::Tuple(v)) if v.len() == 3 => int(p, v[1]).ok_or("legacy view offset")?,
        Some(_) => return Err("its storage view is malformed".into()),
    };
    Ok((key, dtype, view_offset))
}

/// Every storage the pickle's persistent ids declare: key -> (element type, element count).
/// Two declarations of one key that disagree make the file corrupt.
fn declared_storages(p: &Pickle) -> Result<HashMap<String, (DType, usize)>> {
    let mut out: HashMap<String, (DType, usize)> = HashMap::new();
    for v in &p.values {
        let Value::Persistent(pid) = v else { continue };
        let Ok((key, dtype, _)) = storage_id(p, *pid) else { continue };
        let Value::Tuple(f) = p.value(*pid) else { continue };
        let numel = int(p, f[4]).ok_or_else(|| format!("storage `{key}` declares no element count"))?;
        if let Some(old) = out.insert(key.clone(), (dtype, numel))
            && old.1 != numel
        {
            return Err(format!("storage `{key}` is declared with {} and {numel} elements", old.1));
        }
    }
    Ok(out)
}

fn int(p: &Pickle, id: Id) -> Option<usize> {
    match p.value(id) {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn ints(p: &Pickle, id: Id) -> Option<Vec<usize>> {
    match p.value(id) {
        Value::Tuple(v) | Value::List(v) => v.iter().map(|&i| int(p, i)).collect(),
        _ => None,
    }
}

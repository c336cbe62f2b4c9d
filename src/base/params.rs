//! Parameters by module path ("down.0.res.conv1.weight"): collecting them, replacing them, and
//! reading/writing them as safetensors. Paths are the names in every file msfp writes, so
//! checkpoints stay readable by other tools and independent of burn's random parameter ids.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};

/// A host-side f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

thread_local! {
    /// Reads to the host through [`host_values`] and [`host_scalar`] on this thread. On a GPU each
    /// one waits for the device to finish everything queued before it (a sync), so the benches
    /// count them per step. Per thread, so that concurrent work (tests) does not add to a count.
    static HOST_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many reads [`host_values`] and [`host_scalar`] have made on this thread.
pub fn host_reads() -> usize {
    HOST_READS.with(|n| n.get())
}

fn count_read() {
    HOST_READS.with(|n| n.set(n.get() + 1));
}

/// A tensor's values on the host as f32, row-major.
pub fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    count_read();
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// A one-element tensor's value on the host (a loss, a norm).
pub fn host_scalar<const D: usize>(t: Tensor<D>) -> f32 {
    count_read();
    t.into_scalar::<f32>()
}

impl HostTensor {
    pub fn from_tensor<const D: usize>(t: &Tensor<D>) -> Self {
        Self { shape: t.dims().to_vec(), data: host_values(t.clone()) }
    }

    pub fn to_data(&self) -> TensorData {
        TensorData::new(self.data.clone(), self.shape.clone())
    }
}

pub type NamedTensors = BTreeMap<String, HostTensor>;

/// Tracks the dotted module path during a visit; enum variants add no component.
#[derive(Default)]
struct PathTracker {
    stack: Vec<Option<String>>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.stack.push((!container.starts_with("Enum:")).then(|| name.to_string()));
    }
    fn exit(&mut self) {
        self.stack.pop();
    }
    fn path(&self) -> String {
        self.stack.iter().flatten().cloned().collect::<Vec<_>>().join(".")
    }
}

/// What a read-only visit does with each float parameter, given its path.
trait VisitAt {
    fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>);
}

/// What a mapping does with each float parameter, given its path.
trait MapAt {
    fn float<const D: usize>(&mut self, path: String, param: Param<Tensor<D>>) -> Param<Tensor<D>>;
}

/// A visitor or mapper that knows each parameter's module path.
struct Tracked<T> {
    tracker: PathTracker,
    inner: T,
}

impl<T: VisitAt> ModuleVisitor for Tracked<T> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.tracker.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.inner.float(self.tracker.path(), param);
    }
}

impl<T: MapAt> ModuleMapper for Tracked<T> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.tracker.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        self.inner.float(self.tracker.path(), param)
    }
}

fn visit_paths<M: Module, T: VisitAt>(module: &M, inner: T) -> T {
    let mut v = Tracked { tracker: PathTracker::default(), inner };
    module.visit(&mut v);
    v.inner
}

fn map_paths<M: Module, T: MapAt>(module: M, inner: T) -> M {
    module.map(&mut Tracked { tracker: PathTracker::default(), inner })
}

struct Collector {
    out: NamedTensors,
    /// Only parameters that require gradients.
    trainable_only: bool,
}

impl VisitAt for Collector {
    fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !self.trainable_only || value.is_require_grad() {
            self.out.insert(path, HostTensor::from_tensor(&value));
        }
    }
}

/// Every float parameter of `module`, by path.
pub fn collect<M: Module>(module: &M) -> NamedTensors {
    visit_paths(module, Collector { out: BTreeMap::new(), trainable_only: false }).out
}

/// The parameters that require gradients, by path.
pub fn collect_trainable<M: Module>(module: &M) -> NamedTensors {
    visit_paths(module, Collector { out: BTreeMap::new(), trainable_only: true }).out
}

/// The ids of every float parameter of `module` (e.g. of one component, to find it in a model).
pub fn param_ids<M: Module>(module: &M) -> Vec<burn::module::ParamId> {
    struct V(Vec<burn::module::ParamId>);
    impl ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut v = V(Vec::new());
    module.visit(&mut v);
    v.0
}

/// The path of every float parameter of `module`, by id.
pub fn paths_by_id<M: Module>(module: &M) -> HashMap<burn::module::ParamId, String> {
    struct V(HashMap<burn::module::ParamId, String>);
    impl VisitAt for V {
        fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
            self.0.insert(param.id, path);
        }
    }
    visit_paths(module, V(HashMap::new())).0
}

/// Visits every float parameter with its path (read-only).
pub fn for_each_param<M: Module>(module: &M, f: impl FnMut(&str, &Tensor<1>, &[usize])) {
    struct V<F>(F);
    impl<F: FnMut(&str, &Tensor<1>, &[usize])> VisitAt for V<F> {
        fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
            let t = param.val();
            let dims = t.dims();
            let n = dims.iter().product::<usize>();
            (self.0)(&path, &t.reshape([n]), &dims);
        }
    }
    visit_paths(module, V(f));
}

/// The gradient of every parameter that has one, flattened, by path. Gradients are looked up on
/// the parameter tensors themselves (a reshaped view is a new graph node without a gradient).
pub fn collect_grads<M: Module>(module: &M, grads: &burn::tensor::Gradients) -> BTreeMap<String, Tensor<1>> {
    struct V<'a> {
        grads: &'a burn::tensor::Gradients,
        out: BTreeMap<String, Tensor<1>>,
    }
    impl VisitAt for V<'_> {
        fn float<const D: usize>(&mut self, path: String, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                let n = g.dims().iter().product::<usize>();
                self.out.insert(path, g.reshape([n]));
            }
        }
    }
    visit_paths(module, V { grads, out: BTreeMap::new() }).out
}

/// Replaces every float parameter by `f(path, flat_value)` (same length), keeping parameter ids
/// and whether they require gradients. `f` receives and returns tensors without autodiff.
pub fn map_params<M: Module>(module: M, f: impl FnMut(&str, Tensor<1>) -> Tensor<1>) -> M {
    struct Mp<F>(F);
    impl<F: FnMut(&str, Tensor<1>) -> Tensor<1>> MapAt for Mp<F> {
        fn float<const D: usize>(&mut self, path: String, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let require_grad = tensor.is_require_grad();
            let autodiff = tensor.is_autodiff();
            let dims = tensor.dims();
            let n = dims.iter().product::<usize>();
            let flat = tensor.inner().reshape([n]);
            let mut out = (self.0)(&path, flat).reshape(dims);
            if autodiff {
                out = Tensor::from_inner(out);
            }
            if require_grad {
                out = out.require_grad();
            }
            Param::from_mapped_value(id, out, mapper)
        }
    }
    map_paths(module, Mp(f))
}

/// Marks exactly the parameters whose path satisfies `trainable` as requiring gradients (the
/// others are frozen: no gradient is computed or applied for them).
pub fn set_trainable<M: Module>(module: M, trainable: impl Fn(&str) -> bool) -> M {
    struct Mp<F>(F);
    impl<F: Fn(&str) -> bool> MapAt for Mp<F> {
        fn float<const D: usize>(&mut self, path: String, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let tensor = tensor.detach().set_require_grad((self.0)(&path));
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    map_paths(module, Mp(trainable))
}

/// Loads `tensors` into the parameters they name, leaving the others as they are; every tensor
/// must name a parameter of the right shape. `origin` names the file in errors.
pub fn load_subset<M: Module>(module: M, tensors: &NamedTensors, origin: &Path) -> Result<M> {
    let expected = collect_shapes(&module);
    for (name, t) in tensors {
        match expected.get(name) {
            None => {
                return Err(Error::runtime(format!(
                    "{}: tensor `{name}` is not a parameter of this model; was it written for another model or config?",
                    origin.display()
                )));
            }
            Some(shape) if *shape != t.shape => {
                return Err(Error::runtime(format!(
                    "{}: tensor `{name}` has shape {:?} but the model expects {shape:?}",
                    origin.display(),
                    t.shape
                )));
            }
            Some(_) => {}
        }
    }
    Ok(map_params(module, |path, old| match tensors.get(path) {
        Some(t) => Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &old.device()),
        None => old,
    }))
}

/// Loads `tensors` into `module`: every parameter must be present with the right shape and
/// every tensor must be used. `origin` names the file in errors.
pub fn load_into<M: Module>(module: M, tensors: &NamedTensors, origin: &Path) -> Result<M> {
    let expected = collect_shapes(&module);
    let missing: Vec<&String> = expected.keys().filter(|k| !tensors.contains_key(*k)).collect();
    let unused: Vec<&String> = tensors.keys().filter(|k| !expected.contains_key(*k)).collect();
    if !missing.is_empty() || !unused.is_empty() {
        return Err(Error::runtime(format!(
            "{}: does not fit this model ({} missing tensors, e.g. {:?}; {} unexpected, e.g. {:?}); was it written for another model or config?",
            origin.display(),
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            unused.len(),
            unused.iter().take(3).collect::<Vec<_>>()
        )));
    }
    for (name, shape) in &expected {
        let got = &tensors[name].shape;
        if got != shape {
            return Err(Error::runtime(format!(
                "{}: tensor `{name}` has shape {got:?} but the model expects {shape:?}; was it written for another model config?",
                origin.display()
            )));
        }
    }
    Ok(map_params(module, |path, old| {
        let t = &tensors[path];
        Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &old.device())
    }))
}

fn collect_shapes<M: Module>(module: &M) -> HashMap<String, Vec<usize>> {
    let mut shapes = HashMap::new();
    for_each_param(module, |path, _, dims| {
        shapes.insert(path.to_string(), dims.to_vec());
    });
    shapes
}

/// Writes tensors (+ string metadata) to a safetensors file atomically (temp name, then rename).
pub fn save_safetensors(
    path: &Path,
    tensors: &NamedTensors,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
        .collect();
    let out = serialize_canonical(views, metadata)
        .map_err(|e| Error::runtime(format!("{}: cannot serialise: {e}", path.display())))?;
    crate::base::fs::atomic_write(path, &out)
}

/// `safetensors::serialize` with a canonical header. The crate takes the metadata as a
/// `HashMap`, whose iteration order changes from process to process; re-emitting the header
/// with sorted keys makes equal content give equal bytes (bit-exact resume compares files).
pub fn serialize_canonical(
    views: Vec<(String, TensorView<'_>)>,
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let raw = safetensors::serialize(views, Some(meta))?;
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8-byte length")) as usize;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&raw[8..8 + n]).expect("the crate writes a JSON object");
    if let Some(m) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(m).expect("string metadata");
        header.insert("__metadata__".into(), serde_json::to_value(sorted).expect("json"));
    }
    let mut text = serde_json::to_vec(&header).expect("json");
    // The format aligns the data section to 8 bytes by padding the header with spaces.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + raw.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&raw[8 + n..]);
    Ok(out)
}

/// Reads every tensor of a safetensors file as f32 (f16/bf16/f64 are converted), with its metadata.
pub fn load_safetensors(path: &Path) -> Result<(NamedTensors, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::usage(format!("{}: file not found", path.display())),
        _ => Error::runtime(format!("{}: {e}", path.display())),
    })?;
    let corrupt = |e: safetensors::SafeTensorError| {
        Error::runtime(format!(
            "{}: not a valid safetensors file ({e}); re-create or re-download it",
            path.display()
        ))
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let meta: BTreeMap<String, String> =
        header.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(Error::runtime(format!(
                    "{}: tensor `{name}` has dtype {other:?}; only float tensors can be loaded",
                    path.display()
                )));
            }
        };
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::runtime(format!(
                "{}: tensor `{name}` contains NaN or infinite values",
                path.display()
            )));
        }
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok((out, meta))
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let v = match exp {
        0 => (man as f32) * 2f32.powi(-24),
        31 => {
            if man == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        e => (1.0 + man as f32 / 1024.0) * 2f32.powi(e - 15),
    };
    if sign == 1 { -v } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_byte_identical_whatever_the_metadata_order() {
        let dir = tempfile::tempdir().unwrap();
        let tensors =
            BTreeMap::from([("a.weight".to_string(), HostTensor { shape: vec![2], data: vec![1.0, -2.0] })]);
        let meta: BTreeMap<String, String> =
            (0..8).map(|i| (format!("key{i}"), format!("value{i}"))).collect();
        // HashMap order differs between maps with different seeds; the bytes must not.
        let mut files = Vec::new();
        for i in 0..4 {
            let p = dir.path().join(format!("{i}.safetensors"));
            save_safetensors(&p, &tensors, &meta).unwrap();
            files.push(std::fs::read(&p).unwrap());
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]));
        let (back, m) = load_safetensors(&dir.path().join("0.safetensors")).unwrap();
        assert_eq!(back, tensors);
        assert_eq!(m, meta);
    }
}

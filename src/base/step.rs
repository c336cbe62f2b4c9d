//! The denoising step a forward pass serves, as every layer and quantizer sees it.

/// What a forward pass knows about the denoising step it serves. Passed explicitly through
/// every layer so that per-timestep quantizer state and the TALoRA adapter choice are selected
/// by the timestep itself (never by a hidden call counter): a run can resume, or sample with any
/// step count, at any step.
#[derive(Debug, Clone, Default)]
pub struct StepCtx {
    /// The training-schedule timestep shared by the whole batch, when there is one.
    pub timestep: Option<usize>,
    /// TALoRA: the adapter the router chose for this step. Set by the model, read by layers.
    pub route: Option<Route>,
}

impl StepCtx {
    pub fn at(timestep: usize) -> Self {
        Self { timestep: Some(timestep), route: None }
    }

    /// Routed to adapter `adapter` (a fixed choice, no router gradient).
    pub fn with_adapter(timestep: Option<usize>, adapter: usize) -> Self {
        Self { timestep, route: Some(Route { adapter, straight_through: None }) }
    }
}

/// TALoRA's choice for one step. The forward pass always computes with exactly one adapter;
/// a learned router also hands over its straight-through route `[K]` (value one-hot at
/// `adapter`, gradient the softmax's), which layers weigh every adapter by so that the router
/// learns. Without it (the range router, a deployed model) only the chosen adapter is computed.
#[derive(Debug, Clone)]
pub struct Route {
    pub adapter: usize,
    pub straight_through: Option<burn::tensor::Tensor<1>>,
}

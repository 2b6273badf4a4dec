//! Optional recording of intermediate tensors under the golden-fixture names
//! (`beit.layer0`, `swin.res3`, `predictor.round2.attn_mask`, …), for `deris dump` and the parity
//! tests. Disabled taps cost nothing.

use std::collections::BTreeMap;

use candle_core::Tensor;

/// A sink for named intermediate tensors.
#[derive(Debug, Default)]
pub struct Taps {
    tensors: Option<BTreeMap<String, Tensor>>,
}

impl Taps {
    /// Taps that record nothing.
    pub fn off() -> Self {
        Self { tensors: None }
    }

    /// Taps that keep every recorded tensor.
    pub fn on() -> Self {
        Self { tensors: Some(BTreeMap::new()) }
    }

    pub fn enabled(&self) -> bool {
        self.tensors.is_some()
    }

    /// Records `t` under `name` (a cheap reference-counted clone) when enabled.
    pub fn record(&mut self, name: impl Into<String>, t: &Tensor) {
        if let Some(map) = self.tensors.as_mut() {
            map.insert(name.into(), t.clone());
        }
    }

    /// Records a tensor computed only when taps are on (e.g. a transpose for the dump layout).
    pub fn record_with(&mut self, name: impl Into<String>, f: impl FnOnce() -> candle_core::Result<Tensor>) -> candle_core::Result<()> {
        if let Some(map) = self.tensors.as_mut() {
            map.insert(name.into(), f()?);
        }
        Ok(())
    }

    /// The recorded tensors, by name.
    pub fn into_map(self) -> BTreeMap<String, Tensor> {
        self.tensors.unwrap_or_default()
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.as_ref().and_then(|m| m.get(name))
    }
}

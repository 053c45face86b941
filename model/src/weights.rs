//! Named float tensors in the Hugging Face naming scheme (`model.layers.3.self_attn.q_proj.weight`).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;

/// Float weights of a model, keyed by Hugging Face tensor names. Every source converts to this.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

/// The name of one linear projection of a transformer block.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

pub const EMBED: &str = "model.embed_tokens.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const FINAL_NORM: &str = "model.norm.weight";

impl Weights {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts a tensor as f32 (the one dtype the runtime computes in), on the device it is on.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        let tensor = tensor.to_dtype(DType::F32).with_context(|| format!("tensor `{name}`: cannot convert to f32"))?;
        self.tensors.insert(name, tensor);
        Ok(())
    }

    /// A copy of every tensor on `device` (training on a GPU; the sources load to the CPU).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                Ok((
                    name.clone(),
                    t.to_device(device).with_context(|| format!("tensor `{name}`: cannot move to {device:?}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { tensors })
    }

    /// The tensor called `name`, checked against the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).with_context(|| format!("missing tensor `{name}`"))?;
        if t.dims() != shape {
            bail!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The expected shape of every tensor of a model with this config, in a stable order.
    /// Loading checks a source against it, so a wrong or missing tensor is reported by name.
    pub fn expected_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let m = config.intermediate_size;
        let mut out = vec![(EMBED.to_string(), vec![config.vocab_size, h])];
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (name, shape) in [
                ("self_attn.q_proj", [q, h]),
                ("self_attn.k_proj", [kv, h]),
                ("self_attn.v_proj", [kv, h]),
                ("self_attn.o_proj", [h, q]),
                ("mlp.gate_proj", [m, h]),
                ("mlp.up_proj", [m, h]),
                ("mlp.down_proj", [h, m]),
            ] {
                out.push((format!("{p}.{name}.weight"), shape.to_vec()));
            }
            if config.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
        }
        out.push((FINAL_NORM.to_string(), vec![h]));
        if !config.tie_word_embeddings {
            out.push((LM_HEAD.to_string(), vec![config.vocab_size, h]));
        }
        out
    }

    /// Checks that exactly the tensors a model with `config` needs are present, with the right
    /// shapes. Extra tensors are an error too: they mean the config does not describe the file.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let expected = Self::expected_shapes(config);
        for (name, shape) in &expected {
            self.get(name, shape)?;
        }
        if self.tensors.len() != expected.len() {
            let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
            let extra: Vec<&String> = self.tensors.keys().filter(|k| !known.contains(k.as_str())).take(5).collect();
            bail!("unexpected tensors for this architecture: {extra:?}");
        }
        Ok(())
    }
}

//! candle's own implementations of the model as speed baselines in the same run as drq's decode
//! (`drq-bench --candle`): candle-transformers' float Llama (`models::llama`, weights in f32, f16
//! or bf16) and its quantized Llama (`models::quantized_llama`, GGML block types through candle's
//! `QMatMul`: the CPU kernels ported from llama.cpp, or candle's CUDA kernels), on the CPU or on a
//! GPU through candle's CUDA backend (a binary built with the `cuda` feature).

use std::io::Cursor;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, quantized_llama};
use model::source::FloatModel;
use model::Architecture;

/// How candle holds the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CandleWeights {
    /// Float Llama, f32 weights and activations.
    F32,
    /// Float Llama in f16 (on a GPU: cuBLAS half-precision GEMMs).
    F16,
    /// Float Llama in bf16.
    Bf16,
    /// Quantized Llama, GGML Q8_0 (blocks of 32, one f16 scale: 8.5 bits per weight).
    #[value(name = "q8_0")]
    Q8_0,
    /// Quantized Llama, GGML Q4_0 (4.5 bits per weight).
    #[value(name = "q4_0")]
    Q4_0,
    /// Quantized Llama, GGML Q4_1 (5 bits per weight).
    #[value(name = "q4_1")]
    Q4_1,
}

impl CandleWeights {
    pub fn name(self) -> &'static str {
        match self {
            CandleWeights::F32 => "f32",
            CandleWeights::F16 => "f16",
            CandleWeights::Bf16 => "bf16",
            CandleWeights::Q8_0 => "q8_0",
            CandleWeights::Q4_0 => "q4_0",
            CandleWeights::Q4_1 => "q4_1",
        }
    }

    /// The GGML block type of the quantized kinds; `None` for the float ones.
    fn ggml(self) -> Option<GgmlDType> {
        match self {
            CandleWeights::Q8_0 => Some(GgmlDType::Q8_0),
            CandleWeights::Q4_0 => Some(GgmlDType::Q4_0),
            CandleWeights::Q4_1 => Some(GgmlDType::Q4_1),
            _ => None,
        }
    }
}

/// One of candle's models, ready to decode.
pub enum CandleModel {
    Float { model: llama::Llama, config: llama::Config, dtype: DType, cache: llama::Cache, device: Device },
    Quantized { model: quantized_llama::ModelWeights, device: Device },
}

impl CandleModel {
    /// candle's float Llama over `float`'s weights in `dtype` on `device`. Llama without rope
    /// scaling (SmolLM2) only: candle's model is the reference here, not a general loader.
    pub fn float(float: &FloatModel, weights: CandleWeights, device: &Device) -> Result<Self> {
        let dtype = match weights {
            CandleWeights::F32 => DType::F32,
            CandleWeights::F16 => DType::F16,
            CandleWeights::Bf16 => DType::BF16,
            q => bail!("candle {}: a quantized type, not a float one", q.name()),
        };
        let c = &float.config;
        ensure!(c.architecture == Architecture::Llama, "candle's float baseline runs Llama models only");
        ensure!(
            c.rope_scaling.is_none() && !c.attention_bias,
            "candle's float baseline: rope scaling and attention biases are not supported"
        );
        let config = llama::Config {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            use_flash_attn: false,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta as f32,
            bos_token_id: c.bos_token_id,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        let tensors = float.weights.iter().map(|(name, t)| (name.clone(), t.clone())).collect();
        let model = llama::Llama::load(VarBuilder::from_tensors(tensors, dtype, device), &config)
            .context("candle's Llama cannot load these weights")?;
        let cache = llama::Cache::new(true, dtype, &config, device)?;
        Ok(CandleModel::Float { model, config, dtype, cache, device: device.clone() })
    }

    /// candle's quantized Llama from a Llama GGUF file whose weight matrices candle re-quantizes
    /// to `weights` (dequantized, then quantized again, as `llama-quantize --allow-requantize`
    /// does); norms stay f32.
    pub fn quantized(gguf: &Path, weights: CandleWeights, device: &Device) -> Result<Self> {
        let Some(ggml) = weights.ggml() else { bail!("candle {}: a float type, not a quantized one", weights.name()) };
        let read_err = || format!("{}: not a readable GGUF file", gguf.display());
        let mut file = std::fs::File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?;
        let content = gguf_file::Content::read(&mut file).with_context(read_err)?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let t = content.tensor(&mut file, name, &Device::Cpu).with_context(read_err)?;
            let t = if t.shape().rank() == 2 {
                QTensor::quantize(&t.dequantize(&Device::Cpu)?, ggml)
                    .with_context(|| format!("candle cannot quantize `{name}` to {}", weights.name()))?
            } else {
                t
            };
            tensors.push((name.as_str(), t));
        }
        let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let mut buf = Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &metadata, &tensor_refs)?;
        drop(tensors);
        buf.set_position(0);
        let content = gguf_file::Content::read(&mut buf)?;
        let model = quantized_llama::ModelWeights::from_gguf(content, &mut buf, device)
            .context("candle's quantized Llama cannot load this GGUF file")?;
        Ok(CandleModel::Quantized { model, device: device.clone() })
    }

    fn device(&self) -> &Device {
        match self {
            CandleModel::Float { device, .. } | CandleModel::Quantized { device, .. } => device,
        }
    }

    /// Forgets every sequence (a new KV cache).
    fn reset(&mut self) -> Result<()> {
        match self {
            CandleModel::Float { config, dtype, cache, device, .. } => {
                *cache = llama::Cache::new(true, *dtype, config, device)?;
            }
            CandleModel::Quantized { model, .. } => model.clear_kv_cache(),
        }
        Ok(())
    }

    /// The last position's logits `[batch, vocab]` of `tokens` (`[batch, len]`) placed at
    /// `position` onwards.
    fn forward(&mut self, tokens: &Tensor, position: usize) -> Result<Tensor> {
        Ok(match self {
            CandleModel::Float { model, cache, .. } => model.forward(tokens, position, cache)?,
            CandleModel::Quantized { model, .. } => model.forward(tokens, position)?,
        })
    }

    /// Whether a prompt of several positions is one step for several sequences at once:
    /// candle's quantized Llama cannot (its last-position slice is not contiguous for a batch, and
    /// its `QMatMul` refuses it), so there the prompts advance one position per step.
    fn batched_prefill(&self) -> bool {
        matches!(self, CandleModel::Float { .. })
    }

    /// Greedy decoding of equally long `prompts` together (one prefill step, then `gen − 1` steps
    /// of one token per sequence), from an empty cache. Returns the seconds of the prefill (`None`
    /// where the model cannot prefill several sequences in one step and the prompts advanced one
    /// position per step instead) and of the decode steps, and the tokens generated for the first
    /// prompt.
    pub fn greedy(&mut self, prompts: &[Vec<u32>], gen: usize) -> Result<(Option<f64>, f64, Vec<u32>)> {
        ensure!(!prompts.is_empty() && gen >= 1, "nothing to decode");
        let len = prompts[0].len();
        ensure!(len >= 1 && prompts.iter().all(|p| p.len() == len), "candle decodes equally long prompts together");
        self.reset()?;
        let device = self.device().clone();
        let started = Instant::now();
        let (mut next, prefill) = if prompts.len() == 1 || self.batched_prefill() {
            let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
            let tokens = Tensor::from_vec(flat, (prompts.len(), len), &device)?;
            let next = argmax(&self.forward(&tokens, 0)?)?;
            (next, Some(started.elapsed().as_secs_f64()))
        } else {
            let mut logits = None;
            for pos in 0..len {
                let column: Vec<u32> = prompts.iter().map(|p| p[pos]).collect();
                logits = Some(self.forward(&Tensor::from_vec(column, (prompts.len(), 1), &device)?, pos)?);
            }
            (argmax(&logits.expect("len ≥ 1"))?, None)
        };
        let mut first = vec![next[0]];
        let started = Instant::now();
        for i in 1..gen {
            let tokens = Tensor::from_vec(next, (prompts.len(), 1), &device)?;
            next = argmax(&self.forward(&tokens, len + i - 1)?)?;
            first.push(next[0]);
        }
        Ok((prefill, started.elapsed().as_secs_f64(), first))
    }
}

/// Greedy token per row of `[batch, vocab]` logits (copied to the host: the step is finished).
fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

//! GGUF files: dequantize every tensor to f32, map llama.cpp names to Hugging Face ones, undo
//! llama.cpp's Q/K row permutation, and read the config and tokenizer from the metadata.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::FloatModel;
use crate::config::{Architecture, ModelConfig};
use crate::tokenizer;
use crate::weights::Weights;

/// Loads a GGUF file as a float model.
pub fn load(path: &Path) -> Result<FloatModel> {
    let file = File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let config = ModelConfig::from_gguf(&content.metadata, has_output)
        .with_context(|| format!("reading the model config of {}", path.display()))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "{}: GGUF files with `rope_freqs` (Llama 3.1 RoPE scaling) are not supported; \
             load the Hugging Face checkpoint instead",
            path.display()
        );
    }
    let tokenizer = tokenizer::tokenizer_from_gguf(&content.metadata)
        .with_context(|| format!("building the tokenizer of {}", path.display()))?;
    let special = tokenizer::special_tokens_from_gguf(&content.metadata);
    let chat_template = tokenizer::chat_template_from_gguf(&content.metadata);

    let mut weights = Weights::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf_name in names {
        let hf_name =
            hf_name(gguf_name).with_context(|| format!("{}: unexpected tensor `{gguf_name}`", path.display()))?;
        let qtensor = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .with_context(|| format!("{}: cannot read tensor `{gguf_name}`", path.display()))?;
        let mut tensor = qtensor
            .dequantize(&Device::Cpu)
            .with_context(|| format!("{}: cannot dequantize `{gguf_name}`", path.display()))?;
        if config.architecture == Architecture::Llama {
            if gguf_name.ends_with("attn_q.weight") {
                tensor = unpermute_rows(&tensor, config.num_attention_heads)?;
            } else if gguf_name.ends_with("attn_k.weight") {
                tensor = unpermute_rows(&tensor, config.num_key_value_heads)?;
            }
        }
        weights.insert(hf_name, tensor)?;
    }
    weights.validate(&config).with_context(|| format!("{}: tensors do not match the model config", path.display()))?;
    Ok(FloatModel { config, tokenizer, add_bos: special.add_bos, chat_template, weights })
}

/// Maps a llama.cpp tensor name to the Hugging Face one.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf_part = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{kind}"))
}

/// Inverts llama.cpp's conversion permutation of Q/K rows. The converter regroups each head's
/// rows from the Hugging Face order (first halves, then second halves of the rotary pairs) to
/// interleaved pairs: `w.reshape(heads, 2, d/2, in).swapaxes(1, 2)`. This swaps them back.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows % (2 * heads) != 0 {
        bail!("cannot un-permute a {rows}x{cols} Q/K matrix over {heads} heads");
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// The permutation llama.cpp applies on conversion (the inverse of [`unpermute_rows`]); used by
/// tests to build GGUF files the way llama.cpp does.
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if rows % (2 * heads) != 0 {
        bail!("cannot permute a {rows}x{cols} Q/K matrix over {heads} heads");
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, 2, half, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_moves_rows() {
        let w = Tensor::arange(0f32, 48., &Device::Cpu).unwrap().reshape((12, 4)).unwrap();
        let p = permute_rows(&w, 2).unwrap();
        // Head 0 has rows 0..6: halves [0,1,2] and [3,4,5] interleave to 0,3,1,4,2,5.
        let first_col: Vec<f32> = p.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&first_col[..6], &[0., 12., 4., 16., 8., 20.]);
        let back = unpermute_rows(&p, 2).unwrap();
        let diff = (back - &w).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn maps_names() {
        assert_eq!(hf_name("blk.12.attn_q.bias").unwrap(), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(hf_name("blk.0.ffn_down.weight").unwrap(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.1.attn_q.scale").is_none());
    }
}

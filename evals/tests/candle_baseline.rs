//! candle's models as `drq-bench --candle` builds them decode the shared SmolLM2 sensibly: the
//! GGUF re-quantized by candle to Q8_0 and candle's float Llama agree on the greedy text, and a
//! type that cannot hold SmolLM2's rows is a clear error.

use candle_core::Device;
use drq_tests::smollm2_gguf;
use evals::candle_baseline::{CandleModel, CandleWeights};
use model::source::{self, ModelSource};

#[test]
fn candle_q8_0_and_float_llama_decode_the_shared_model_alike() {
    let gguf = smollm2_gguf();
    let (float, _) = source::load_float(&ModelSource::Gguf(gguf.clone())).unwrap();
    let prompt = float.tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let prompts = vec![prompt.clone(), prompt];

    let mut q8 = CandleModel::quantized(&gguf, CandleWeights::Q8_0, &Device::Cpu).unwrap();
    let (prefill, decode, q8_tokens) = q8.greedy(&prompts, 8).unwrap();
    assert!(prefill.is_none() && decode > 0.0, "two prompts advance one position per step");
    let text = float.tokenizer.decode(&q8_tokens, true).unwrap();
    assert!(text.contains("Paris"), "candle q8_0 wrote {text:?}");
    // A second run starts from an empty cache: the same tokens; one prompt is prefilled in one step.
    assert_eq!(q8.greedy(&prompts, 8).unwrap().2, q8_tokens);
    let (prefill, _, alone) = q8.greedy(&prompts[..1], 8).unwrap();
    assert!(prefill.is_some_and(|s| s > 0.0));
    assert_eq!(alone, q8_tokens);

    let mut f32 = CandleModel::float(&float, CandleWeights::F32, &Device::Cpu).unwrap();
    let f32_tokens = f32.greedy(&prompts, 8).unwrap().2;
    assert_eq!(f32_tokens, q8_tokens, "candle f32 {:?}", float.tokenizer.decode(&f32_tokens, true));

    // Type mix-ups are errors, not panics.
    assert!(CandleModel::quantized(&gguf, CandleWeights::F16, &Device::Cpu).is_err());
    assert!(CandleModel::float(&float, CandleWeights::Q4_0, &Device::Cpu).is_err());
    let err = q8.greedy(&[vec![1, 2], vec![1]], 4).expect_err("unequal prompts");
    assert!(err.to_string().contains("equally long"), "{err}");
}

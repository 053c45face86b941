//! The float runtime on the real GGUF must reproduce the reference perplexity (18.724 over the
//! first 300 predicted tokens of sample.txt, no BOS; ../shared/reference).

use evals::perplexity::{evaluate, windows, Candidate, Protocol};
use model::{source, OpsMode, Transformer};

#[test]
fn float_gguf_reproduces_reference_perplexity() {
    let reference = drq_tests::smollm2_reference();
    let ids: Vec<u32> = reference["sample"]["ids_first_301"]
        .as_array()
        .expect("ids_first_301")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids.len(), 301);
    let (float, _) = source::load_float(&source::ModelSource::Gguf(drq_tests::smollm2_gguf())).unwrap();
    let transformer = Transformer::new(&float.config, &float.weights, OpsMode::Inference).unwrap();
    let w = windows(&ids, 301, Protocol::Strided { stride: 301 }, None).unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].scored(), 300);
    let report = evaluate(&[Candidate::new("fp", &transformer)], None, &w, |_| {}).unwrap();
    let ppl = report[0].perplexity;
    eprintln!("perplexity {ppl:.4}");
    assert!((ppl - 18.724).abs() / 18.724 < 0.001, "perplexity {ppl} is not within 0.1% of 18.724");
}

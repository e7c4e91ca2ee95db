"""Stage 1, models. In: a model spec (hub id, local directory, .gguf file, random:SHAPE, or the
embedded default). Out: a resolved local directory, its tokenizer, a loaded causal LM.

    loading    specs, GGUF dequantisation, the neobench cache, random models, fingerprints, the vocabulary check
    precision  --dtype: native-bf16 detection, autocast
    adapters   the peft variants (lora, dora, pissa, rslora, moslora) and MoSLoRA's mixer
"""

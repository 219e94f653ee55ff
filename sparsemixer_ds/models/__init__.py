"""The model families the trainer knows through ``families.ModelFamily``.

    native.py         this project's decoder LM (one device; MoE blocks from moe.py)
    moe.py            SparseMixerGate, SparseMixerMoE, convert, the baselines' gate: the only module that touches
                      DeepSpeed's MoE layer
    hf.py             Hugging Face MoE models (PhiMoE, Mixtral, Qwen3-MoE) as a family
    autoep.py         SparseMixerRouter in DeepSpeed's AutoEP layers, use_sparsemixer: the only module that touches
                      deepspeed.module_inject
    hf_checkpoint.py  HF checkpoints in (--init-from) and out (export --format hf)
    families.py       the model seam: what the trainer needs of a model, chosen by model.family
    flops.py          parameters (total, active) and training FLOPs per token of a config; the peak FLOP/s
"""

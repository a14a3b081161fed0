"""The generation engine of LLM servables: request rows and their lifecycle (`runner`), the slot KV cache
(`kv_cache`), batched sampling (`sampling`), stage-to-stage transfer (`transfer`), tensor-parallel layers and
checkpoint slicing for model files (`layers`, `checkpoint`), and the contract a model file implements
(`model`). A model file (top-level ``agents/``) holds model code only; `shard.EngineShard` binds it to the
Agent runtime."""

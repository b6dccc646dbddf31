"""CodeLlama-7b teacher (a local HF folder) -> a randomly initialised ~100M Llama student with the
same tokenizer (vocab 32016), logit distillation at T=2 in bf16: the reference's single-GPU recipe
(batch 4 x 8 accumulation steps, 50k steps, lr 1e-4). The teacher is read straight into bf16
(13.5 GB); the student's 100.1M parameters and AdamW state fit beside it on a 24 GB card.

python prepare/text.py input=path/to/code/ tokenizer=path/to/CodeLlama-7b-hf out=data/code
python distill.py config/distill_codellama_7b_to_100m.py teacher=path/to/CodeLlama-7b-hf
python convert.py to=hf source=out/codellama_7b_to_100m out=hf/codellama_100m
"""
dataset = "data/code"
teacher = "models/CodeLlama-7b-hf"  # config.json, model-0000x-of-00002.safetensors, tokenizer.json
teacher_dtype = "bfloat16"
out_dir = "out/codellama_7b_to_100m"
# the student: 12 x 768 Llama, 4 k/v heads for 12 queries, SwiGLU 2048 wide, head tied to the
# embedding: 24.6M embedding + 75.5M in blocks
family = "llama"
n_layer = 12
n_head = 12
n_kv_head = 4
n_embd = 768
intermediate_size = 2048
rope_theta = 1e6  # CodeLlama's base (Rozière et al. 2023)
norm_eps = 1e-5
tie_embeddings = True
bias = False
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 8
gradient_checkpointing = True
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 1000
max_iters = 50000
distill_type = "logit"
temperature = 2.0
kd_loss = "forward_kl"
eval_interval = 1000
eval_iters = 50
keep_last = 3
dtype = "bfloat16"
compile = True

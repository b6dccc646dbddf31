"""BabyLM, end to end (the reference BabyLM distillation project): GPT-2 Large teacher fine-tuned
on the 10M-word track, a GPT-2 Small CE baseline and a distilled GPT-2 Small, both from random init.

python prepare/babylm.py input=path/to/train_10M out=data/babylm
python train.py config/distill_babylm.py init_from=gpt2-large out_dir=out/babylm_teacher \
    learning_rate=3e-5 min_lr=3e-6 max_iters=2000
python train.py config/distill_babylm.py out_dir=out/babylm_baseline
python distill.py config/distill_babylm.py teacher=out/babylm_teacher out_dir=out/babylm_distilled
python evaluate.py models=teacher=out/babylm_teacher,baseline=out/babylm_baseline,distilled=out/babylm_distilled dataset=data/babylm
"""
dataset = "data/babylm"
teacher = "out/babylm_teacher"
out_dir = "out/babylm_distilled"
model = "gpt2"
block_size = 512
batch_size = 16
gradient_accumulation_steps = 4
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 500
max_iters = 10000
eval_interval = 500
eval_iters = 50
distill_type = "hybrid"
alpha = 0.5
temperature = 2.0
kd_loss = "forward_kl"

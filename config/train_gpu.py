# The default one-GPU config: `python train.py` on a CUDA machine (bf16 autocast).
# 145M parameters (8 experts, of which 2 + a shared one run per token: ~70M active), context 1024 tokens.
# MSA layers (all but the first) read K=4 blocks of 64 tokens: 256 of up to 1024 keys per query.
# 32K tokens per iteration; 2000 iterations are 66M tokens (about 40 passes over the Shakespeare text, whose
# 1.5M tokens are what limits this model; the images are unlimited).
out_dir = "out"
n_layer = 8
n_head = 8
n_kv_head = 2
n_embd = 512
index_dim = 64
n_dense_layers = 1
msa_block_size = 64
msa_topk = 4
n_expert = 8
expert_topk = 2
expert_hidden = 1024
seq_len = 1024
batch_size = 32
gradient_accumulation_steps = 1   # one micro-step an iteration (more replay the same CUDA graphs; train.py sums them)
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 200
learning_rate = 1e-3
min_lr = 1e-4
kl_warmup_iters = 200
eval_interval = 500
eval_iters = 20
eval_captions = 64
eval_long_range = 16
log_interval = 10

# The CPU preset: `python train.py` on a machine without CUDA. Finishes in under 10 minutes on 2 cores.
# Selection is really sparse: T=256 in blocks of 32 is 8 blocks, each query reads K=4 of them.
out_dir = "out"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
index_dim = 32
n_dense_layers = 1
msa_block_size = 32
msa_topk = 4
n_expert = 4
expert_topk = 2
expert_hidden = 256
seq_len = 256
batch_size = 8
max_iters = 200
lr_decay_iters = 200
warmup_iters = 20
learning_rate = 3e-3
min_lr = 3e-4
eval_interval = 100
kl_warmup_iters = 30
eval_iters = 2
eval_captions = 32
eval_long_range = 4
log_interval = 10

# The CPU preset: `python train.py` on a machine without CUDA; 330K tokens, under 10 minutes on 2 cores.
# Selection is really sparse: T=128 in blocks of 16 is 8 blocks, and each query reads K=4 of them.
# The short context keeps the text windows short, so more of the tokens are image-caption pairs (p_image too).
out_dir = "out"
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
index_dim = 32
n_dense_layers = 1
msa_block_size = 16
msa_topk = 4
n_expert = 4
expert_topk = 2
expert_hidden = 256
seq_len = 128
batch_size = 8
p_image = 0.8
max_iters = 320
lr_decay_iters = 320
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
kl_warmup_iters = 50
eval_interval = 160
eval_iters = 4
eval_captions = 64
eval_long_range = 4
log_interval = 20
compile = False        # torch.compile is for the GPU

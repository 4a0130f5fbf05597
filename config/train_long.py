# Long context on one GPU: rows of 128K tokens. `python train.py config/train_long.py` is the MSA arm; add
# `--attention=dense --out_dir=out-long-dense` for the dense arm: every layer dense GQA (SDPA), nothing else
# changed, and the same batches (the data position depends only on seed, iteration and micro-step).
# MSA: each query reads K=16 blocks of 128 = 2048 keys, 1/64 of the context.
# Why 128K: the MoE, the LM head and the loss cost the same in both arms and grow with T; dense attention grows
# with T^2, MSA's main branch with T, so the arms part ways only at long contexts (dev/model.md has the
# measurements). 128K fits one 80 GB card because the LM loss is computed chunk by chunk
# (linear_cross_entropy never holds the fp32 logits, which would be 26 GB).
# No dense first layer and no dense-KL warm-up: at this length both cost speed (the warm-up's KL over every
# visible token is O(T^2), about as much as the whole run) and measured no better recall (dev/model.md).
# The long-range questions ask ~100K-128K tokens after the password (first vs last tenth of the row): 50x the
# 2048 keys a query reads, so only the indexer choosing that far block can answer it.
# 200 iterations of 128K tokens = 26M tokens (Shakespeare's 1.4M training tokens are the limit).
out_dir = "out-long"
n_layer = 4
n_head = 6
n_kv_head = 2
n_embd = 384
index_dim = 64
n_dense_layers = 0
msa_block_size = 128
msa_topk = 16
n_expert = 8
expert_topk = 2
expert_hidden = 1024
seq_len = 131072
batch_size = 1
gradient_accumulation_steps = 1
max_iters = 200
lr_decay_iters = 200
warmup_iters = 20
learning_rate = 1e-3
min_lr = 1e-4
kl_warmup_iters = 0
eval_interval = 25
eval_iters = 4
eval_captions = 64
eval_long_range = 16
log_interval = 10
compile = False        # its measurements ran eagerly (train.py compiles by default on CUDA)

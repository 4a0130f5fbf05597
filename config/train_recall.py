# Retrieval at 8K tokens where sparsity is real: each MSA query reads K * bs = 16 * 32 = 512 keys, 1/16 of the row.
# Every row (after the warm-up) is the recall task: Shakespeare text with a fact "\n Bob fox\n" per 32 tokens,
# each asked again later, at any distance (data.mqar_row); loss on the text and the answers alike.
# The schedule: 1000 iterations of induction warm-up rows of 256 tokens (the lookup by content forms there), then
# 2000 iterations of recall rows of 256, 512, 1K, 2K, 4K tokens (400 each), then 3000 at 8K. The same 32K tokens
# per iteration throughout.
# 2 layers (the first dense, the second MSA), 20M parameters; for one GPU (on a CPU the reference attention's
# T x T scores at 8K tokens do not fit in memory). The four arms, same batches:
#   python train.py config/train_recall.py --out_dir=out-recall-idx
#   python train.py config/train_recall.py --msa_select=local  --out_dir=out-recall-local
#   python train.py config/train_recall.py --msa_select=random --out_dir=out-recall-random
#   python train.py config/train_recall.py --attention=dense   --out_dir=out-recall-dense
out_dir = "out-recall"
n_layer = 2
n_head = 8
n_kv_head = 2
n_embd = 256
index_dim = 64
index_rope = False     # content-only index scores: a fact's key scores alike at every distance (with RoPE on the
                       # index branch the indexer misses far facts' blocks far more often: dev/retrieval.md)
n_dense_layers = 1
msa_block_size = 32    # 16 blocks of 32 rather than 8 of 64 (the same 512 keys): a fact's block then competes with
msa_topk = 16          # half as many other tokens for one of twice as many picks (dev/retrieval.md)
n_expert = 8
expert_topk = 2
expert_hidden = 512
seq_len = 8192
batch_size = 4
gradient_accumulation_steps = 1
p_mqar = 1.0
p_image = 0.0          # the val batches: text only (every training row is a warm-up or recall row, which
                       # p_image does not touch), so the val LM is the LM loss on held-out text
repeat_iters = 1000
short_iters = 2000
short_len = 256
max_iters = 6000
lr_decay_iters = 6000
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
kl_warmup_iters = 200
eval_interval = 400
eval_iters = 4
eval_captions = 0
eval_long_range = 0
eval_mqar = 8
log_interval = 50
compile = False        # its measurements ran eagerly (train.py compiles by default on CUDA)

# Training-step timings: CUDA (base config, batch 16, the config's fp16 setting) and CPU with 2 threads.
BIN=$1
[ -x "$BIN/train_step" ] || { echo "no train_step benchmark carried"; exit 1; }
"$BIN/train_step" --bench --device cuda --only base --batch 16 --configs configs
"$BIN/train_step" --bench --device cpu --threads 2 --batch 2 --configs configs

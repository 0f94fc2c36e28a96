# Input pipeline rate on this idle machine, one thread, beside the torchvision pipeline when it exists.
BIN=$1
DIR=.gpu-carry/jpegs
ls "$DIR"/*.jpg >/dev/null 2>&1 || { echo "no JPEGs carried"; exit 1; }
"$BIN/xvlm" bench-data --images "$DIR" --res 224 --n 500 --threads 1
if python3 -c 'import torchvision, PIL' 2>/dev/null; then
  python3 scripts/bench_torch_pipeline.py "$DIR" --res 224 --n 500
else
  echo "torchvision/PIL not installed here: no reference rate"
fi

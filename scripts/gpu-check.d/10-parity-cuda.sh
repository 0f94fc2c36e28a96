# Every parity case with a model, run on CUDA (TF32 off) and compared with the official CPU tensors.
BIN=$1
status=0
for case in tests/fixtures/parity/*/; do
  kind=$(sed -n 's/^kind: *//p' "$case/case.yaml")
  case $kind in
    image_preprocessing|param_keys|relpos_resize|finetune_data) continue ;;  # no model: CPU only, covered by the tests
    pretrain_train_steps|finetune_train_steps) echo "$(basename "$case"): skipped, the train-step replay runs on the CPU only"; continue ;;
  esac
  out=$("$BIN/xvlm" parity "$case" --device cuda 2>&1); rc=$?
  fails=$(grep -c FAIL <<<"$out")
  worst=$(grep -o 'max_rel [0-9.e+-]*' <<<"$out" | awk '{print $2}' | sort -g | tail -1)
  echo "$(basename "$case") ($kind) on cuda: rc=$rc, $(grep -c PASS <<<"$out") pass, $fails fail, worst max_rel $worst"
  [ $rc = 0 ] || { grep FAIL <<<"$out" | head -5; status=1; }
done
exit $status

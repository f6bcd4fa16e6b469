#!/bin/bash
# The compositions the README quotes, again with seeds 1 and 2 (2026-12-08), each on the core of the
# longer demo's run of the same seed (ace-train stage=pipeline experiment=demo_fmnist_full seed=n) and,
# for the 12-epoch gates, on the method table's cert-nets of that seed
# (experiments/cert_methods_fmnist/run.py --epochs 12 --seeds 1 2). One torch thread per job.
#   bash experiments/compose_fmnist/seeds.sh [runs root, default runs]
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
R=$(realpath "${1:-runs}")
for n in 1 2; do
  # entropy selection on a selection-co-trained cert-net (select_negatives=wrong); the copied core is skipped
  d=$R/compose/demo_select_negwrong_entropy/eps_0.1_seed$n
  mkdir -p "$d"
  [ -d "$d/core" ] || cp -r "$R/demo_fmnist_full/eps_0.1_seed$n/core" "$d/core"
  $PY -m ace_lightning.train stage=pipeline experiment=demo_fmnist_select seed=$n runs_root="$R" \
     run_name=compose/demo_select_negwrong_entropy/eps_0.1_seed$n trainer.enable_progress_bar=false \
     ++stage_overrides.cert.select_negatives=wrong > "$d/pipeline.log" 2>&1
  $PY experiments/compose_fmnist/run.py --collect-only --seed $n --name demo_select_negwrong_entropy \
     --selection entropy --runs-root "$R" -- experiment=demo_fmnist_select ++stage_overrides.cert.select_negatives=wrong
done
for n in 1 2; do
  $PY experiments/compose_fmnist/run.py --seed $n --name ibp_e12_gate_ibp --cert-run "$R/cert_methods/IBP_e12_seed$n/eps_0.03" \
      --core-run "$R/demo_fmnist_full/eps_0.1_seed$n" --experiment demo_fmnist_full --runs-root "$R"
  $PY experiments/compose_fmnist/run.py --seed $n --name mtl_a0.1_e12_gate_ibp \
      --cert-run "$R/cert_methods/MTL-IBP_e12_seed$n/eps_0.03" --core-run "$R/demo_fmnist_full/eps_0.1_seed$n" \
      --experiment fmnist_mtlibp --runs-root "$R" -- stage_overrides.gate.method=IBP \
      '++stage_overrides.gate.label_method=[IBP,CROWN-IBP]' 'stage_overrides.certify.methods=[IBP,CROWN-IBP,CROWN]' \
      'stage_overrides.certify.refine_methods=[CROWN]'
done

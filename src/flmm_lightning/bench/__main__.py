from flmm_lightning.bench.cli import main

main()

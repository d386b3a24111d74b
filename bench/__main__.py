from bench.cpu_op import main

main()

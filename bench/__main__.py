from bench.op import main

main()

raise ImportError("a broken deploy")

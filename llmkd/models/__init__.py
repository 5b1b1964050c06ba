"""Model builders: MoE upcycling of dense decoders, the dual-head (DHO) student."""

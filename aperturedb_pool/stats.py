# placeholder: being written
class PoolStats: pass

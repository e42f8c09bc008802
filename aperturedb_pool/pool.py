# placeholder: being written
class ConnectionPool: pass
class Lease: pass

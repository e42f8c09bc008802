# placeholder: being written
class RetryPolicy: pass

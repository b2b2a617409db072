module routheon/modelrouter

go 1.22

module github.com/dnbd3go/dnbd3go

go 1.26.8
